"""Mirror plans: split a client's SQL text into statements and decide how each one reaches the mirrors.

A write is mirrored one of three ways. REPLAY runs the client's own text again (with the same
parameters) and is only chosen when that provably gives byte-identical rows: no clock, randomness,
sequence, unknown function, or read of another table whose state may differ at apply time. IMAGE
runs the write on the primary with ``row_to_json`` of each affected row appended to its RETURNING
list, and the mirror applies those rows by key. UNSAFE is a write that can be neither (MERGE, CALL,
DO, a writable CTE, …): the session reports it instead of mirroring it wrongly.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Final, TypeAlias

import pglast.ast as _pg_ast
from pglast import keywords as _pg_keywords
from pglast import parser as _pg_parser
from pglast.stream import RawStream

from proxy.errors import ProtocolViolation
from proxy.mirror.model import ImageOp
from proxy.sql.analysis import (
    _BACKEND_LOCAL_FUNC_PREFIXES,
    _BACKEND_LOCAL_FUNCS,
    _DDL_PREFIXES,
    _DROP_TABLE_LIKE,
    _FIELD_TYPES,
    _NODE_NAMES,
    _STABLE,
    _TX_OPS,
    _VOLATILE,
    _VOLATILE_PREFIXES,
    TxOp,
    _option_true,
)
from proxy.sql.cache import TextCache, literal_free_key

__all__ = [
    "IMAGE_COLUMN",
    "Action",
    "PlanCache",
    "StatementPlan",
    "plan_sql",
    "quote_ident",
    "rewrite_parse",
]

IMAGE_COLUMN: Final = "pgshift_row"  # the output column the IMAGE rewrite appends (always the last one)


class Action(enum.Enum):
    """How one statement is mirrored."""

    NONE = "none"  # not mirrored: reads, session and cursor commands, maintenance, EXPLAIN, empty text
    TX = "tx"  # transaction control
    REPLAY = "replay"  # deterministic write: its text (+ the same parameters) has the same effect on a mirror
    IMAGE = "image"  # computes values: run with a RETURNING of the full row; mirrors apply row images by key
    DDL = "ddl"  # schema change (CREATE/ALTER/DROP/COMMENT/GRANT, CREATE TABLE AS, SELECT INTO, REFRESH …)
    UNSAFE = "unsafe"  # a write that can be neither replayed faithfully nor captured as row images


@dataclass(frozen=True, slots=True)
class StatementPlan:
    """The mirroring decision for one statement of a client's text (immutable: shared through PlanCache)."""

    action: Action
    sql: str  # the statement's own text as the client wrote it (no trailing ';', stripped)
    fingerprint: str  # pglast fingerprint of ``sql`` (hex); "" if it cannot be computed
    tables: tuple[str, ...]  # tables written, as written and quoted where needed: 'public."Order"'
    reason: str = ""  # IMAGE: why not replayable; UNSAFE: what makes it unsafe; REPLAY of a SELECT: why
    tx_op: TxOp | None = None  # TX: which operation
    savepoint: str | None = None  # SAVEPOINT/RELEASE/ROLLBACK TO: the name as Postgres folds it
    rewritten: str | None = None  # IMAGE: ``sql`` with the row image appended to its RETURNING list
    op: ImageOp | None = None  # IMAGE: how the mirror applies the rows
    table: str | None = None  # IMAGE: the target table as written, quoted where needed
    conflict: str | None = None  # IMAGE UPSERT: the conflict target as accepted after "ON CONFLICT "
    returning: bool = False  # IMAGE: the client's statement had its own RETURNING list
    copy_in: bool = False  # REPLAY of COPY … FROM STDIN
    copy_columns: tuple[str, ...] | None = None  # COPY t (a, b) FROM STDIN: column names as Postgres folds them


# --- identifiers ----------------------------------------------------------------------------------------------------
_PLAIN_IDENT: Final = re.compile(r"[a-z_][a-z0-9_]*\Z")
# Postgres' quote_ident() quotes every keyword that is not unreserved.
_QUOTED_KEYWORDS: Final = frozenset(
    _pg_keywords.RESERVED_KEYWORDS | _pg_keywords.COL_NAME_KEYWORDS | _pg_keywords.TYPE_FUNC_NAME_KEYWORDS
)


def quote_ident(name: str) -> str:
    """``name`` as Postgres' quote_ident() writes it: bare only when it would read back unchanged."""
    if _PLAIN_IDENT.match(name) is not None and name not in _QUOTED_KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


# --- function knowledge ---------------------------------------------------------------------------------------------
# Built-ins whose result differs between the primary's run and a mirror's replay. now() and friends are
# stable within a transaction, but the mirror's transaction starts later; the sequence functions hand out
# the mirror's own values; the server address differs by definition.
_NONDETERMINISTIC: Final = frozenset(
    {
        "now", "transaction_timestamp", "statement_timestamp", "clock_timestamp", "timeofday", "random",
        "random_normal", "setseed", "gen_random_uuid", "uuidv4", "uuidv7", "gen_random_bytes", "gen_salt",
        "nextval", "currval", "lastval", "setval", "txid_current", "txid_current_if_assigned",
        "pg_current_xact_id", "pg_current_xact_id_if_assigned", "inet_server_addr", "inet_server_port",
        "pg_trigger_depth",
        # the database and role the statement runs as: on a mirror, its own name and the apply account
        "current_database", "current_catalog", "current_user", "current_role", "session_user", "user",
    }
)  # fmt: skip
_NONDETERMINISTIC_PREFIXES: Final = ("uuid_generate_",)
# Large-object functions that change pg_largeobject: a data write hidden in a SELECT.
_LO_WRITERS: Final = frozenset(
    {"lo_create", "lo_creat", "lo_import", "lo_unlink", "lo_from_bytea", "lo_put", "lowrite", "lo_truncate",
     "lo_truncate64"}
)  # fmt: skip
# Aggregates whose result depends on the order rows arrive in (scan order differs between servers)
# unless the call has its own ORDER BY.
_ORDER_SENSITIVE_AGGS: Final = frozenset(
    {
        "array_agg", "string_agg", "json_agg", "jsonb_agg", "json_agg_strict", "jsonb_agg_strict",
        "json_object_agg", "jsonb_object_agg", "json_object_agg_strict", "jsonb_object_agg_strict",
        "json_object_agg_unique", "jsonb_object_agg_unique", "json_object_agg_unique_strict",
        "jsonb_object_agg_unique_strict", "xmlagg", "any_value", "range_agg", "range_intersect_agg",
    }
)  # fmt: skip
# Date/time input words evaluated when the literal is converted: 'now'::timestamptz is now().
_TIME_WORDS: Final = frozenset({"now", "today", "tomorrow", "yesterday"})
# SQLValueFunctions whose value differs on a mirror: CURRENT_TIMESTAMP & co. read the clock, and
# CURRENT_USER & co. name the role running the statement (on the mirror: the apply account).
_CLOCK_SVFOPS: Final = frozenset(
    {
        "SVFOP_CURRENT_DATE", "SVFOP_CURRENT_TIME", "SVFOP_CURRENT_TIME_N", "SVFOP_CURRENT_TIMESTAMP",
        "SVFOP_CURRENT_TIMESTAMP_N", "SVFOP_LOCALTIME", "SVFOP_LOCALTIME_N", "SVFOP_LOCALTIMESTAMP",
        "SVFOP_LOCALTIMESTAMP_N", "SVFOP_CURRENT_ROLE", "SVFOP_CURRENT_USER", "SVFOP_USER", "SVFOP_SESSION_USER",
        "SVFOP_CURRENT_CATALOG", "SVFOP_CURRENT_SCHEMA",
    }
)  # fmt: skip
# System columns whose values are physical (ctid, xmin, …) or catalog OIDs (tableoid): they differ on a mirror.
_SYSTEM_COLUMNS: Final = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})


class _Fn(enum.Enum):
    DETERMINISTIC = 1  # a built-in known stable or immutable
    NONDETERMINISTIC = 2  # a built-in that reads the clock, randomness, sequences, server identity
    SIDE_EFFECT = 3  # a volatile built-in that writes no table data (locks, NOTIFY, settings, admin)
    WRITES = 4  # a built-in that writes data (large objects)
    UNKNOWN = 5  # a user function, or a built-in this module does not know: may do anything


def _function_kind(parts: list[str], nargs: int) -> _Fn:
    # Only unqualified or pg_catalog. names are the built-ins: app.now() is the application's function.
    if not (len(parts) == 1 or (len(parts) == 2 and parts[0] == "pg_catalog")):
        return _Fn.UNKNOWN
    base = parts[-1]
    if base in _NONDETERMINISTIC or base.startswith(_NONDETERMINISTIC_PREFIXES):
        return _Fn.NONDETERMINISTIC
    if base == "age" and nargs == 1:
        return _Fn.NONDETERMINISTIC  # age(x) is age(current_date, x)
    if base in _LO_WRITERS:
        return _Fn.WRITES
    if base in _BACKEND_LOCAL_FUNCS or base.startswith(_BACKEND_LOCAL_FUNC_PREFIXES):
        return _Fn.NONDETERMINISTIC  # answered per server instance or backend
    if base in _VOLATILE or base.startswith(_VOLATILE_PREFIXES):
        return _Fn.SIDE_EFFECT
    if base in _STABLE:
        return _Fn.DETERMINISTIC
    return _Fn.UNKNOWN


# --- JSON parse tree helpers ----------------------------------------------------------------------------------------
_Fields: TypeAlias = dict[str, object]
_Cause: TypeAlias = tuple[int, str]  # (source location, description): the lowest location is "the first"
_NO_LOCATION: Final = 1 << 62
_DML: Final = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_NO_TYPES: Final[dict[str, str]] = {}


def _unwrap(node: object) -> tuple[str, _Fields]:
    """A wrapped node {"Type": {fields}} → ("Type", fields); anything else → ("", {})."""
    if isinstance(node, dict) and len(node) == 1:
        ((key, inner),) = node.items()
        if isinstance(inner, dict) and key in _NODE_NAMES:
            return key, inner
    return "", {}


def _as_list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _sval(node: object) -> str | None:
    """The text of a String node (wrapped or not)."""
    typ, fields = _unwrap(node)
    if typ == "String":
        node = fields
    return _str(node.get("sval")) if isinstance(node, dict) else None


def _location(fields: _Fields) -> int:
    loc = fields.get("location")
    return loc if isinstance(loc, int) and loc >= 0 else _NO_LOCATION


def _names(items: object) -> list[str]:
    return [_sval(item) or "" for item in _as_list(items)]


def _relation(rel: object) -> str | None:
    """A RangeVar as written: its parts quoted where needed and joined with dots."""
    if not isinstance(rel, dict):
        return None
    name = _str(rel.get("relname"))
    if name is None:
        return None
    parts = [p for p in (_str(rel.get("catalogname")), _str(rel.get("schemaname")), name) if p is not None]
    return ".".join(quote_ident(p) for p in parts)


def _relation_key(rel: _Fields) -> tuple[str | None, str | None, str | None]:
    return _str(rel.get("catalogname")), _str(rel.get("schemaname")), _str(rel.get("relname"))


def _dedup(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


class _Scan:
    """Walk one statement's JSON tree once, recording what stands in the way of replaying it."""

    __slots__ = ("causes", "current_of", "may_write", "nested_writes", "reads", "target")

    def __init__(self, target: _Fields | None) -> None:
        self.target = _relation_key(target) if target is not None else None
        self.causes: list[_Cause] = []  # nondeterminism: clock, randomness, unknown functions, scan order
        self.reads: list[_Cause] = []  # tables read other than the target: (location, name)
        self.may_write: list[_Cause] = []  # functions that may write data (for SELECT): (location, name)
        self.nested_writes: list[str] = []  # targets of INSERT/UPDATE/DELETE/MERGE below the top: writable CTEs
        self.current_of = False

    @property
    def first_cause(self) -> str | None:
        """The cause that comes first in the text; other-table reads are reported together."""
        candidates = list(self.causes)
        if self.reads:
            names = ", ".join(_dedup([name for _, name in sorted(self.reads)]))
            candidates.append((min(loc for loc, _ in self.reads), f"reads other tables: {names}"))
        return min(candidates)[1] if candidates else None

    def run(self, root: _Fields, root_type: str, skip: frozenset[str] = frozenset()) -> _Scan:
        # Iterative: deep expressions must not exhaust Python's stack. Items: (value, type, visible CTE names).
        stack: list[tuple[object, str | None, frozenset[str]]] = []
        self._children(root, root_type, frozenset(), stack, skip)
        while stack:
            value, typ, ctes = stack.pop()
            if isinstance(value, list):
                stack.extend((item, None, ctes) for item in value if isinstance(item, dict | list))
                continue
            if not isinstance(value, dict):
                continue
            if typ is None:
                wrapped, inner = _unwrap(value)
                if wrapped:
                    typ, value = wrapped, inner
            if typ is not None and self._visit(typ, value, ctes):
                continue
            self._children(value, typ, ctes, stack, frozenset())
        return self

    def _children(
        self,
        fields: _Fields,
        typ: str | None,
        ctes: frozenset[str],
        stack: list[tuple[object, str | None, frozenset[str]]],
        skip: frozenset[str],
    ) -> None:
        types = _FIELD_TYPES.get(typ, _NO_TYPES) if typ is not None else _NO_TYPES
        with_clause = fields.get("withClause")
        if isinstance(with_clause, dict):
            ctes = self._with(with_clause, ctes, stack)
        for key, child in fields.items():
            if key != "withClause" and key not in skip and isinstance(child, dict | list):
                stack.append((child, types.get(key), ctes))

    def _with(
        self, clause: _Fields, ctes: frozenset[str], stack: list[tuple[object, str | None, frozenset[str]]]
    ) -> frozenset[str]:
        """Queue the CTE bodies; return the names visible in the statement's body."""
        items = [_unwrap(item)[1] for item in _as_list(clause.get("ctes"))]
        names = [_str(cte.get("ctename")) or "" for cte in items]
        recursive = bool(clause.get("recursive"))
        visible = ctes | frozenset(names)
        for index, cte in enumerate(items):
            # A non-recursive CTE sees only the CTEs before it: `WITH t AS (SELECT * FROM t)` reads table t.
            scope = visible if recursive else ctes | frozenset(names[:index])
            stack.append((cte.get("ctequery"), None, scope))
        return visible

    def _visit(self, typ: str, f: _Fields, ctes: frozenset[str]) -> bool:
        """Record what this node means; True when its children need no walk."""
        if typ == "FuncCall":
            self._function(f)
        elif typ == "RangeVar":
            self._table(f, ctes)
            return True
        elif typ in _DML:
            self.nested_writes.append(_relation(f.get("relation")) or "")
        elif typ == "SelectStmt":
            count = _unwrap(f.get("limitCount"))[1]
            if (count and not count.get("isnull")) or f.get("limitOffset") is not None:
                self.causes.append((_location(count), "LIMIT/OFFSET picks rows in scan order"))
            if any(item for item in _as_list(f.get("distinctClause"))):
                self.causes.append((_NO_LOCATION, "DISTINCT ON picks rows in scan order"))
        elif typ == "SQLValueFunction":
            op = _str(f.get("op")) or ""
            if op in _CLOCK_SVFOPS:
                name = op.removeprefix("SVFOP_").removesuffix("_N").lower()
                self.causes.append((_location(f), f"calls {name}"))
            return True
        elif typ == "A_Const":
            value = f.get("sval")
            text = _str(value.get("sval")) if isinstance(value, dict) else None
            if text is not None and text.strip().lower() in _TIME_WORDS:
                self.causes.append((_location(f), f"uses the time literal '{text.strip()}'"))
            return True
        elif typ == "ColumnRef":
            fields = _as_list(f.get("fields"))
            column = _sval(fields[-1]) if fields else None
            if column in _SYSTEM_COLUMNS:
                self.causes.append((_location(f), f"uses the system column {column}"))
            return True
        elif typ == "SetToDefault":
            self.causes.append((_location(f), "uses DEFAULT"))
            return True
        elif typ == "CurrentOfExpr":
            self.current_of = True
            return True
        elif typ == "RangeTableSample":
            self.causes.append((_location(f), "TABLESAMPLE picks rows at random"))
        elif typ in ("JsonArrayAgg", "JsonObjectAgg"):
            self.causes.append((_location(f), "JSON aggregate depends on row order"))
        return False

    def _function(self, f: _Fields) -> None:
        parts = [p.lower() for p in _names(f.get("funcname"))]
        if not parts:
            return
        name = ".".join(parts)
        loc = _location(f)
        kind = _function_kind(parts, len(_as_list(f.get("args"))))
        if kind is _Fn.WRITES or kind is _Fn.UNKNOWN:
            self.may_write.append((loc, name))
        if kind is not _Fn.DETERMINISTIC:
            self.causes.append((loc, f"calls {name}()"))
        elif f.get("over") is not None:
            self.causes.append((loc, f"window function {name}() depends on row order"))
        elif parts[-1] in _ORDER_SENSITIVE_AGGS and not f.get("agg_order") and not f.get("agg_within_group"):
            self.causes.append((loc, f"{name}() without ORDER BY depends on row order"))

    def _table(self, rel: _Fields, ctes: frozenset[str]) -> None:
        key = _relation_key(rel)
        if key[0] is None and key[1] is None and key[2] in ctes:
            return  # a CTE of an enclosing WITH, not a table
        if key == self.target:
            return  # the target's own rows are the same on the mirror (same name as written: same table)
        name = _relation(rel)
        if name is not None:
            self.reads.append((_location(rel), name))


# --- classification -------------------------------------------------------------------------------------------------
_NONE_STATEMENTS: Final = frozenset(
    {
        "VariableSetStmt", "VariableShowStmt", "LockStmt", "NotifyStmt", "ListenStmt", "UnlistenStmt",
        "VacuumStmt", "PrepareStmt", "DeallocateStmt", "DiscardStmt", "CheckPointStmt", "FetchStmt",
        "ClosePortalStmt", "ReindexStmt", "ClusterStmt", "LoadStmt", "ConstraintsSetStmt",
        # server configuration, not data of a database: each server keeps its own
        "AlterSystemStmt",
    }
)  # fmt: skip
_SAVEPOINT_OPS: Final = frozenset({TxOp.SAVEPOINT, TxOp.RELEASE, TxOp.ROLLBACK_TO})
_DML_TARGET_SKIP: Final = frozenset({"relation"})  # the target is recorded apart, not as a read


@dataclass(frozen=True, slots=True)
class _Ctx:
    text: str
    fingerprint: str
    functions_write: bool

    def plan(self, action: Action, tables: tuple[str, ...] = (), reason: str = "") -> StatementPlan:
        return StatementPlan(action, self.text, self.fingerprint, tables, reason=reason)


def _classify(typ: str, f: _Fields, ctx: _Ctx) -> StatementPlan:
    if typ == "SelectStmt":
        return _select(f, ctx)
    if typ == "InsertStmt":
        return _insert(f, ctx)
    if typ in ("UpdateStmt", "DeleteStmt"):
        return _update_delete(typ, f, ctx)
    if typ == "TransactionStmt":
        op = _TX_OPS.get(_str(f.get("kind")) or "")
        savepoint = _str(f.get("savepoint_name")) if op in _SAVEPOINT_OPS else None
        return StatementPlan(Action.TX, ctx.text, ctx.fingerprint, (), tx_op=op, savepoint=savepoint)
    if typ == "CopyStmt":
        return _copy(f, ctx)
    if typ == "TruncateStmt":
        tables = [_relation(_unwrap(rel)[1]) for rel in _as_list(f.get("relations"))]
        return ctx.plan(Action.REPLAY, _dedup([t for t in tables if t]))
    if typ == "ExplainStmt":
        return _explain(f, ctx)
    if typ == "DeclareCursorStmt":
        # Postgres accepts only a SELECT (or VALUES) here; its functions run at each FETCH.
        inner_type, inner = _unwrap(f.get("query"))
        if inner_type != "SelectStmt":
            return ctx.plan(Action.UNSAFE, reason=f"DECLARE CURSOR for a {inner_type or 'statement'}")
        query = _select(inner, ctx)
        if query.action is Action.NONE:
            return ctx.plan(Action.NONE)
        return ctx.plan(Action.UNSAFE, query.tables, f"DECLARE CURSOR: {query.reason}")
    if typ == "MergeStmt":
        target = _relation(f.get("relation"))
        return ctx.plan(Action.UNSAFE, (target,) if target else (), "MERGE: no RETURNING before PostgreSQL 17")
    if typ == "CallStmt":
        return ctx.plan(Action.UNSAFE, reason="CALL of a procedure")
    if typ == "DoStmt":
        return ctx.plan(Action.UNSAFE, reason="DO block")
    if typ == "ExecuteStmt":
        return ctx.plan(Action.UNSAFE, reason="EXECUTE of an SQL-level prepared statement")
    if typ in _NONE_STATEMENTS:
        return ctx.plan(Action.NONE)
    if typ in ("RefreshMatViewStmt", "CreateTableAsStmt") or typ.startswith(_DDL_PREFIXES):
        return ctx.plan(Action.DDL, _ddl_tables(typ, f))
    # A statement type this module does not know (a newer parser): assume it writes, and say so.
    return ctx.plan(Action.UNSAFE, reason=f"unrecognised statement {typ}")


def _select(f: _Fields, ctx: _Ctx) -> StatementPlan:
    scan = _Scan(None).run(f, "SelectStmt")
    if scan.nested_writes:
        return ctx.plan(Action.UNSAFE, _dedup([t for t in scan.nested_writes if t]), "writable CTE")
    into = f.get("intoClause")
    if isinstance(into, dict):
        target = _relation(into.get("rel"))
        return ctx.plan(Action.DDL, (target,) if target else ())
    # now(), random(), nextval(), setval() write no table data (sequences are synchronised at cut-over);
    # a function the proxy does not know may write anything, and only the operator knows whether it does.
    if scan.may_write and ctx.functions_write:
        names = ", ".join(_dedup([name for _, name in sorted(scan.may_write)]))
        return ctx.plan(Action.REPLAY, reason=f"SELECT calls functions that may write: {names}")
    return ctx.plan(Action.NONE)


def _image(f: _Fields, ctx: _Ctx, op: ImageOp, reason: str, conflict: str | None = None) -> StatementPlan:
    rel = f.get("relation")
    table = _relation(rel) or ""
    alias = rel.get("alias") if isinstance(rel, dict) else None
    ref_name = _str(alias.get("aliasname")) if isinstance(alias, dict) else None
    if ref_name is None:
        ref_name = _str(rel.get("relname")) if isinstance(rel, dict) else None
    ref = quote_ident(ref_name or "")
    returning = isinstance(f.get("returningClause"), dict)
    # RETURNING is syntactically last, so appending keeps the client's text (parameters, literals, casts)
    # byte for byte; the newline ends a trailing `--` comment; the image column is the last output column.
    image = f"row_to_json({ref}.*)::text AS {IMAGE_COLUMN}"
    rewritten = f"{ctx.text}\n, {image}" if returning else f"{ctx.text}\nRETURNING {image}"
    return StatementPlan(
        Action.IMAGE,
        ctx.text,
        ctx.fingerprint,
        (table,),
        reason=reason,
        rewritten=rewritten,
        op=op,
        table=table,
        conflict=conflict,
        returning=returning,
    )


def _insert(f: _Fields, ctx: _Ctx) -> StatementPlan:
    target = f.get("relation")
    scan = _Scan(target if isinstance(target, dict) else None).run(f, "InsertStmt", _DML_TARGET_SKIP)
    if scan.nested_writes:
        tables = _dedup([t for t in [_relation(target), *scan.nested_writes] if t])
        return ctx.plan(Action.UNSAFE, tables, "writable CTE")
    # Always an image: columns the statement omits may take serial, identity, uuid or now() defaults
    # (or trigger-computed values) the proxy cannot see.
    reason = scan.first_cause or "omitted columns may have defaults"
    on_conflict = f.get("onConflictClause")
    if isinstance(on_conflict, dict) and on_conflict.get("action") == "ONCONFLICT_UPDATE":
        return _image(f, ctx, ImageOp.UPSERT, reason, _conflict_target(ctx.text, on_conflict))
    return _image(f, ctx, ImageOp.INSERT, reason)


def _conflict_target(text: str, on_conflict: _Fields) -> str | None:
    """The ON CONFLICT target as Postgres accepts it after "ON CONFLICT ": '(a, b) WHERE …' or 'ON CONSTRAINT c'."""
    infer = on_conflict.get("infer")
    if not isinstance(infer, dict):
        return None  # DO UPDATE without a target is rejected by Postgres itself
    conname = _str(infer.get("conname"))
    if conname is not None:
        return f"ON CONSTRAINT {quote_ident(conname)}"
    # pglast deparses from its AST objects, not the JSON tree: parse this one statement again (upserts only).
    try:
        stmt = _pg_parser.parse_sql(text)[0].stmt
        clause = stmt.onConflictClause if isinstance(stmt, _pg_ast.InsertStmt) else None
        return str(RawStream()(clause.infer)) if clause is not None and clause.infer is not None else None
    except Exception:
        return None  # not expected for a text the JSON parse accepted; the apply side then keys by primary key


def _update_delete(typ: str, f: _Fields, ctx: _Ctx) -> StatementPlan:
    target = f.get("relation")
    scan = _Scan(target if isinstance(target, dict) else None).run(f, typ, _DML_TARGET_SKIP)
    table = _relation(target)
    tables = (table,) if table else ()
    if scan.nested_writes:
        return ctx.plan(Action.UNSAFE, _dedup([*tables, *(t for t in scan.nested_writes if t)]), "writable CTE")
    if scan.current_of:
        return ctx.plan(Action.UNSAFE, tables, "WHERE CURRENT OF a cursor")
    from_clause = _as_list(f.get("fromClause"))
    if typ == "UpdateStmt" and from_clause and not scan.reads:
        # With several joined rows per target row, which one updates it depends on scan order.
        scan.causes.append((_NO_LOCATION, "UPDATE … FROM may join several rows to a target row"))
    op = ImageOp.UPDATE if typ == "UpdateStmt" else ImageOp.DELETE
    reason = scan.first_cause
    if reason is not None:
        return _image(f, ctx, op, reason)
    return ctx.plan(Action.REPLAY, tables)


def _copy(f: _Fields, ctx: _Ctx) -> StatementPlan:
    target = _relation(f.get("relation"))
    tables = (target,) if target else ()
    if f.get("is_from"):
        if f.get("is_program"):
            return ctx.plan(Action.UNSAFE, tables, "COPY from a program")
        if f.get("filename") is not None:
            return ctx.plan(Action.UNSAFE, tables, "COPY from a server file")
        where = f.get("whereClause")
        if where is not None:
            cause = _Scan(None).run({"whereClause": where}, "").first_cause
            if cause is not None:
                return ctx.plan(Action.UNSAFE, tables, f"COPY … WHERE {cause}")
        columns = f.get("attlist")
        copy_columns = tuple(_names(columns)) if isinstance(columns, list) else None
        return StatementPlan(Action.REPLAY, ctx.text, ctx.fingerprint, tables, copy_in=True, copy_columns=copy_columns)
    query_type, query = _unwrap(f.get("query"))
    if query_type in _DML:
        return ctx.plan(Action.UNSAFE, _dedup([_relation(query.get("relation")) or ""]), "COPY of a write")
    if query_type == "SelectStmt":
        inner = _select(query, ctx)
        if inner.action is not Action.NONE:
            return ctx.plan(Action.UNSAFE, inner.tables, f"COPY TO: {inner.reason}")
    return ctx.plan(Action.NONE)


def _explain(f: _Fields, ctx: _Ctx) -> StatementPlan:
    analyze = False
    for option in _as_list(f.get("options")):
        option_type, opt = _unwrap(option)
        if option_type == "DefElem" and opt.get("defname") == "analyze":
            analyze = _option_true(opt.get("arg"))
    if not analyze:
        return ctx.plan(Action.NONE)  # plans only: nothing runs
    query_type, query = _unwrap(f.get("query"))
    if query_type == "SelectStmt" and _select(query, ctx).action is Action.NONE:
        return ctx.plan(Action.NONE)
    target = _relation(query.get("relation")) if query_type in _DML else None
    return ctx.plan(Action.UNSAFE, (target,) if target else (), "EXPLAIN ANALYZE runs the write")


def _ddl_tables(typ: str, f: _Fields) -> tuple[str, ...]:
    """The relations a DDL statement creates or changes, where the tree names them plainly."""
    found: list[str | None] = [_relation(f.get(key)) for key in ("relation", "view", "sequence")]
    for key in ("into", "intoClause"):
        into = f.get(key)
        if isinstance(into, dict):
            found.append(_relation(into.get("rel")))
    if typ == "DropStmt" and f.get("removeType") in _DROP_TABLE_LIKE:
        for obj in _as_list(f.get("objects")):
            parts = _names(_unwrap(obj)[1].get("items"))
            if parts and all(parts):
                found.append(".".join(quote_ident(p) for p in parts))
    elif typ == "GrantStmt" and f.get("objtype") == "OBJECT_TABLE":
        found.extend(_relation(_unwrap(obj)[1]) for obj in _as_list(f.get("objects")))
    return _dedup([name for name in found if name])


# --- splitting ------------------------------------------------------------------------------------------------------
def _fingerprint(text: str) -> str:
    try:
        return str(_pg_parser.fingerprint(text))
    except Exception:
        return ""


def plan_sql(sql: str, *, functions_write: bool = False) -> tuple[StatementPlan, ...]:
    """One plan per statement of ``sql``, in order. Never raises.

    A text pglast cannot parse gives one NONE plan whose reason starts with "parse error:": Postgres
    rejects it as well, so nothing is mirrored. A text without statements (empty, comments) gives ().
    """
    if "\x00" in sql:
        # The parser stops at a NUL and would vouch for a prefix only (a wire message cannot hold one).
        return (StatementPlan(Action.NONE, sql, "", (), reason="parse error: statement text contains a NUL"),)
    try:
        tree: object = json.loads(_pg_parser.parse_sql_json(sql))
    except Exception as exc:  # ParseError, but also UnicodeEncodeError for lone surrogates
        return (StatementPlan(Action.NONE, sql, "", (), reason=f"parse error: {str(exc) or type(exc).__name__}"),)
    raw = _as_list(tree.get("stmts")) if isinstance(tree, dict) else []
    # Statement locations are byte offsets into the UTF-8 text.
    ascii_text = sql.isascii()
    data = b"" if ascii_text else sql.encode()
    plans: list[StatementPlan] = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        start = item.get("stmt_location", 0)
        length = item.get("stmt_len", 0)  # 0: up to the end of the text
        start = start if isinstance(start, int) else 0
        end = start + length if isinstance(length, int) and length > 0 else None
        text = (sql[start:end] if ascii_text else data[start:end].decode()).strip()
        ctx = _Ctx(text, _fingerprint(text), functions_write)
        typ, fields = _unwrap(item.get("stmt"))
        try:
            plans.append(_classify(typ, fields, ctx))
        except Exception as exc:  # a defect in the classification must not break the session: report it
            plans.append(ctx.plan(Action.UNSAFE, reason=f"plan failed: {type(exc).__name__}: {exc}"))
    return tuple(plans)


# --- cache ----------------------------------------------------------------------------------------------------------
class PlanCache(TextCache[tuple[StatementPlan, ...]]):
    """:func:`plan_sql` results keyed by the exact SQL text (bounds: TextCache). ``functions_write``
    is fixed for the cache's lifetime: it is part of every answer."""

    __slots__ = ("_shapes", "functions_write", "shared")

    def __init__(
        self,
        capacity: int = 10_000,
        *,
        functions_write: bool = False,
        max_text_length: int = 64 * 1024,
        max_total_length: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__(capacity, max_text_length=max_text_length, max_total_length=max_total_length)
        self.functions_write = functions_write
        self.shared = 0  # plans derived from a shape (a text differing only in literals)
        self._shapes: OrderedDict[str, StatementPlan] = OrderedDict()

    def get(self, sql: str) -> tuple[StatementPlan, ...]:
        """The plans of ``sql``; the same tuple for the same text while it stays cached.

        Simple-protocol clients inline their values, so most texts are seen once (pgbench -M
        simple: every one). A single statement that differs from a planned one only in its
        literals has the same plan but for its text: it is derived from that plan (its "shape",
        keyed like the analysis cache) instead of running pglast again."""
        entries = self._entries
        found = entries.get(sql)
        if found is not None:
            entries.move_to_end(sql)
            self.hits += 1
            return found
        key = _shape_key(sql)
        if key is not None:
            shape = self._shapes.get(key)
            if shape is not None:
                self.shared += 1
                return (_with_text(shape, _statement_text(sql)),)
        self.misses += 1
        result = plan_sql(sql, functions_write=self.functions_write)
        if key is not None and len(result) == 1 and _shareable(result[0], sql):
            self._shapes[key] = result[0]
            if len(self._shapes) > self.capacity:
                self._shapes.popitem(last=False)
        return self._store(sql, result)

    def clear(self) -> None:
        """Forget every entry (counters are kept: they are lifetime metrics)."""
        super().clear()
        self._shapes.clear()


# (_TIME_WORDS: string literals whose value is computed when the statement runs, 'now'::timestamp.
# A plan made for one literal value must not serve another: texts that may hold one are not shared.)


def _shape_key(sql: str) -> str | None:
    if ";" in sql.rstrip().rstrip(";"):
        return None  # (several statements, maybe: their texts are sliced by position; planned whole)
    key = literal_free_key(sql, single=True)
    if key is None:
        return None
    if "'" in sql:
        lowered = sql.lower()
        if any(word in lowered for word in _TIME_WORDS):
            return None
    return key


def _statement_text(sql: str) -> str:
    """A single statement's own text as plan_sql slices it (no surrounding space, no ';')."""
    return sql.strip().rstrip(";").rstrip()


def _shareable(plan: StatementPlan, sql: str) -> bool:
    """Whether ``plan`` depends on ``sql`` only through its text fields (``sql``, ``rewritten``)."""
    text = _statement_text(sql)
    if plan.sql != text or (plan.rewritten is not None and not plan.rewritten.startswith(text)):
        return False
    # Literal values must not leak into the other fields (an ON CONFLICT … WHERE b = 5).
    fields = (plan.conflict or "", plan.reason, *plan.tables, *(plan.copy_columns or ()))
    return not any("'" in f or any(c.isdigit() for c in f) for f in fields)


def _with_text(shape: StatementPlan, text: str) -> StatementPlan:
    rewritten = None if shape.rewritten is None else text + shape.rewritten[len(shape.sql) :]
    return replace(shape, sql=text, rewritten=rewritten)


# --- Parse frames ---------------------------------------------------------------------------------------------------
_HEADER: Final = struct.Struct("!ci")
_I16: Final = struct.Struct("!h")


def rewrite_parse(frame: bytes, new_sql: str, *, encoding: str = "utf-8") -> bytes:
    """A Parse frame equal to ``frame`` but with ``new_sql`` as its text (name and parameter types kept).

    ``encoding`` is the session's client_encoding as Python names it: the server reads the text in it.
    Raises ProtocolViolation when ``frame`` is not a well-formed Parse message, ValueError when the new
    text contains a NUL (it would end the text early).
    """
    if len(frame) < _HEADER.size:
        raise ProtocolViolation("malformed Parse message: shorter than its header")
    code, length = _HEADER.unpack_from(frame)
    if code != b"P":
        raise ProtocolViolation(f"malformed Parse message: type {code!r}")
    if length != len(frame) - 1:
        raise ProtocolViolation(f"malformed Parse message: length {length} for {len(frame) - 1} bytes")
    name_end = frame.find(b"\x00", _HEADER.size)
    sql_end = frame.find(b"\x00", name_end + 1) if name_end >= 0 else -1
    if sql_end < 0:
        raise ProtocolViolation("malformed Parse message: unterminated string")
    types = frame[sql_end + 1 :]
    count = _I16.unpack_from(types)[0] if len(types) >= _I16.size else -1
    if count < 0 or len(types) != _I16.size + 4 * count:
        raise ProtocolViolation("malformed Parse message: bad parameter type count")
    text = new_sql.encode(encoding)
    if b"\x00" in text:
        raise ValueError("the new SQL text contains a NUL character")
    body = frame[_HEADER.size : name_end + 1] + text + b"\x00" + types
    return _HEADER.pack(b"P", len(body) + 4) + body
