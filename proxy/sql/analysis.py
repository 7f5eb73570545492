"""Statement analysis with pglast: what one SQL text reads, writes, calls and changes in the session."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import pglast.ast as _pg_ast
from pglast import parser as _pg_parser

__all__ = ["Analysis", "Kind", "Pin", "TxOp", "analyze"]


class Kind(enum.Enum):
    """What a statement (or the strongest statement of a multi-statement text) does."""

    READ = "read"
    WRITE = "write"
    DDL = "ddl"
    TRANSACTION = "transaction"
    SESSION = "session"
    COPY_IN = "copy_in"
    COPY_OUT = "copy_out"
    UTILITY = "utility"
    UNKNOWN = "unknown"


class TxOp(enum.Enum):
    """Transaction control operations (BEGIN/START → BEGIN, END → COMMIT, ABORT → ROLLBACK)."""

    BEGIN = "begin"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    SAVEPOINT = "savepoint"
    RELEASE = "release"
    ROLLBACK_TO = "rollback_to"
    PREPARE = "prepare"
    COMMIT_PREPARED = "commit_prepared"
    ROLLBACK_PREPARED = "rollback_prepared"


class Pin(enum.Enum):
    """Session state that cannot be replicated to another backend: the session stays on the primary."""

    TEMP_TABLE = "temp_table"
    LISTEN = "listen"
    ADVISORY_LOCK = "advisory_lock"
    PREPARE = "prepare"
    CURSOR_WITH_HOLD = "cursor_with_hold"
    SET_CONFIG = "set_config"
    UNKNOWN_SESSION_STATE = "unknown_session_state"


# Strength order for a multi-statement text: the strongest statement decides the kind.
_STRENGTH: Final[dict[Kind, int]] = {
    Kind.READ: 0,
    Kind.COPY_OUT: 1,
    Kind.UTILITY: 2,
    Kind.TRANSACTION: 3,
    Kind.SESSION: 4,
    Kind.COPY_IN: 5,
    Kind.DDL: 6,
    Kind.WRITE: 7,
    Kind.UNKNOWN: 8,
}


@dataclass(frozen=True, slots=True)
class Analysis:
    """The routing-relevant facts of one SQL text (shared between sessions through the cache: immutable).

    ``backend_local`` is an addition to the issue's field list: the text reads state that exists once per
    server instance (``pg_stat_activity``, ``pg_backend_pid()``, ``version()``, ``SHOW server_version``...),
    so only the primary's answer is the one the client expects (it sees the primary's pid and version).
    """

    kind: Kind
    statement_count: int
    tables_read: frozenset[str]
    tables_written: frozenset[str]
    functions: frozenset[str]
    volatile: bool
    unknown_functions: frozenset[str]
    locking: bool
    writable_cte: bool
    select_into: bool
    tx_op: TxOp | None
    read_only_tx: bool
    pins: frozenset[Pin]
    session_setting: bool
    hint: str | None
    parse_error: str | None
    backend_local: bool = False
    # Prepared statements DEALLOCATEd by name ("*": DEALLOCATE ALL). They are protocol-level ones
    # too, which the session tracks per backend: it follows along instead of pinning.
    deallocates: tuple[str, ...] = ()
    label: str = field(init=False, default="")  # kind.value, kept as a plain str for per-request metrics

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.kind.value)

    @property
    def is_read(self) -> bool:
        """True only for a read that may be served by ANY backend."""
        return (
            self.kind is Kind.READ
            and not self.locking
            and not self.volatile
            and not self.unknown_functions
            and not self.writable_cte
            and not self.select_into
            and not self.pins
            and not self.backend_local
        )


# --- function knowledge -------------------------------------------------------------------------------------------
# Matched on the last name component: a user function shadowing one of these names is treated as the built-in,
# which errs towards the primary.
_VOLATILE: Final = frozenset(
    {
        "nextval", "setval", "currval", "lastval", "random", "random_normal", "setseed", "gen_random_uuid",
        "uuidv4", "uuidv7", "clock_timestamp", "timeofday", "txid_current", "txid_current_if_assigned",
        "pg_current_xact_id", "pg_current_xact_id_if_assigned", "set_config", "pg_notify", "pg_cancel_backend",
        "pg_terminate_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_switch_wal", "pg_create_restore_point",
        "pg_backup_start", "pg_backup_stop", "pg_read_file", "pg_read_binary_file", "pg_stat_file", "pg_ls_dir",
        "pg_relation_size", "pg_total_relation_size", "pg_table_size", "pg_indexes_size", "pg_database_size",
        "pg_is_in_recovery", "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn",
        "pg_drop_replication_slot", "pg_blocking_pids", "pg_safe_snapshot_blocking_pids", "pg_import_system_collations",
        "pg_promote", "pg_wal_replay_pause", "pg_wal_replay_resume", "pg_try_advisory_lock", "gen_salt",
        "gen_random_bytes", "pg_log_backend_memory_contexts", "pg_get_wal_replay_pause_state", "pg_trigger_depth",
        "txid_status", "pg_xact_status",
    }
)  # fmt: skip
_VOLATILE_PREFIXES: Final = (
    "pg_advisory_", "pg_try_advisory_", "lo_", "dblink", "pg_sleep", "uuid_generate_", "pg_stat_reset",
    "pg_replication_origin_", "pg_logical_", "pg_create_", "pg_copy_", "pg_ls_", "pg_file_",
)  # fmt: skip
# Session-level advisory locks outlive the statement (the _xact_ variants end with the transaction: no pin).
_ADVISORY_SESSION_LOCKS: Final = frozenset(
    {"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"}
)
# Functions that leave state in the session which a later statement elsewhere would not see.
_SESSION_STATE_FUNCS: Final = frozenset({"dblink_connect", "dblink_connect_u", "dblink_open", "setseed"})
# Stable but answered per server instance or per backend process: only the primary's answer is right.
_BACKEND_LOCAL_FUNCS: Final = frozenset(
    {
        "pg_backend_pid", "version", "pg_postmaster_start_time", "pg_conf_load_time", "pg_my_temp_schema",
        "pg_is_other_temp_schema", "pg_listening_channels", "pg_notification_queue_usage", "pg_current_snapshot",
        "txid_current_snapshot", "pg_lock_status", "pg_prepared_statement", "pg_cursor", "pg_prepared_xact",
        "pg_control_system", "pg_control_checkpoint", "pg_control_recovery", "pg_control_init", "pg_jit_available",
        "pg_last_wal_receive_lsn", "pg_last_wal_replay_lsn", "pg_last_xact_replay_timestamp",
        "pg_get_replication_slots", "pg_show_all_settings", "pg_stat_get_activity", "inet_client_addr",
        "inet_client_port",
    }
)  # fmt: skip
_BACKEND_LOCAL_FUNC_PREFIXES: Final = ("pg_stat_get_", "pg_stat_have_")
# Built-in functions known stable or immutable (unqualified or pg_catalog.): safe on any backend. Anything not
# here (and not volatile) is reported in unknown_functions for the routing layer's pg_proc lookup.
_STABLE: Final = frozenset(
    {
        # the serving server's address: informational, and how tests see who served a read
        "inet_server_port", "inet_server_addr",
        # aggregates and window functions
        "count", "sum", "avg", "min", "max", "array_agg", "string_agg", "bool_and", "bool_or", "every",
        "json_agg", "jsonb_agg", "json_object_agg", "jsonb_object_agg", "json_agg_strict", "jsonb_agg_strict",
        "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "corr", "covar_pop",
        "covar_samp", "regr_slope", "regr_intercept", "percentile_cont", "percentile_disc", "mode", "bit_and",
        "bit_or", "bit_xor", "xmlagg", "any_value", "range_agg", "range_intersect_agg", "row_number", "rank",
        "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead", "first_value", "last_value",
        "nth_value", "grouping",
        # math
        "abs", "ceil", "ceiling", "floor", "round", "trunc", "sign", "sqrt", "cbrt", "power", "pow", "exp", "ln",
        "log", "log10", "mod", "div", "pi", "degrees", "radians", "sin", "cos", "tan", "asin", "acos", "atan",
        "atan2", "gcd", "lcm", "factorial", "width_bucket", "scale", "min_scale", "trim_scale", "numeric",
        "int2", "int4", "int8", "float4", "float8", "text", "bool", "date", "time", "timestamp", "timestamptz",
        "interval", "uuid", "inet", "cidr", "host", "masklen", "network", "family", "abbrev", "set_masklen",
        # strings
        "lower", "upper", "initcap", "length", "char_length", "character_length", "octet_length", "bit_length",
        "concat", "concat_ws", "format", "left", "right", "lpad", "rpad", "ltrim", "rtrim", "btrim", "replace",
        "reverse", "repeat", "split_part", "strpos", "position", "substring", "substr", "overlay", "translate",
        "md5", "sha224", "sha256", "sha384", "sha512", "encode", "decode", "to_hex", "ascii", "chr",
        "regexp_replace", "regexp_match", "regexp_matches", "regexp_split_to_array", "regexp_split_to_table",
        "regexp_count", "regexp_instr", "regexp_like", "regexp_substr", "starts_with", "quote_ident",
        "quote_literal", "quote_nullable", "string_to_array", "string_to_table", "array_to_string", "normalize",
        "is_normalized", "unistr", "convert", "convert_from", "convert_to", "like_escape", "similar_to_escape",
        "similar_escape", "collation_for", "casefold", "get_byte", "set_byte", "get_bit", "set_bit", "parse_ident",
        "to_ascii", "unaccent",
        # date / time (now() and friends are stable: the transaction's start time)
        "now", "transaction_timestamp", "statement_timestamp", "date_trunc", "date_part", "extract", "age",
        "make_date", "make_time", "make_timestamp", "make_timestamptz", "make_interval", "to_char", "to_date",
        "to_timestamp", "to_number", "justify_days", "justify_hours", "justify_interval", "isfinite", "date_bin",
        "timezone", "overlaps", "date_add", "date_subtract",
        # json
        "json_build_object", "jsonb_build_object", "json_build_array", "jsonb_build_array", "to_json", "to_jsonb",
        "row_to_json", "array_to_json", "json_object", "jsonb_object", "json_extract_path", "jsonb_extract_path",
        "json_extract_path_text", "jsonb_extract_path_text", "jsonb_set", "jsonb_set_lax", "jsonb_insert",
        "jsonb_strip_nulls", "json_strip_nulls", "jsonb_pretty", "json_typeof", "jsonb_typeof", "json_array_length",
        "jsonb_array_length", "json_array_elements", "jsonb_array_elements", "json_array_elements_text",
        "jsonb_array_elements_text", "json_each", "jsonb_each", "json_each_text", "jsonb_each_text",
        "json_object_keys", "jsonb_object_keys", "json_populate_record", "jsonb_populate_record",
        "json_populate_recordset", "jsonb_populate_recordset", "json_to_record", "jsonb_to_record",
        "json_to_recordset", "jsonb_to_recordset", "jsonb_path_query", "jsonb_path_exists", "jsonb_path_match",
        "jsonb_path_query_array", "jsonb_path_query_first", "json_scalar", "json_serialize", "jsonb_concat",
        # arrays, ranges, set-returning helpers
        "array_length", "array_lower", "array_upper", "array_position", "array_positions", "array_append",
        "array_prepend", "array_cat", "array_remove", "array_replace", "array_dims", "array_ndims", "array_fill",
        "array_reverse", "array_sort", "cardinality", "unnest", "generate_series", "generate_subscripts",
        "isempty", "lower_inc", "upper_inc", "lower_inf", "upper_inf", "range_merge", "int4range", "int8range",
        "numrange", "tsrange", "tstzrange", "daterange",
        # text search
        "to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery", "websearch_to_tsquery", "ts_rank",
        "ts_rank_cd", "ts_headline", "setweight", "numnode", "querytree", "strip", "tsvector_to_array",
        "array_to_tsvector", "ts_lexize", "ts_debug",
        # session / catalog information (session GUCs are replayed on every backend of the session)
        "current_setting", "current_database", "current_catalog", "current_schema", "current_schemas",
        "current_user", "current_role", "session_user", "user", "pg_typeof", "format_type", "to_regclass",
        "to_regtype", "to_regtypemod", "to_regproc", "to_regprocedure", "to_regnamespace", "to_regrole",
        "to_regoper", "to_regcollation", "obj_description", "col_description", "shobj_description",
        "pg_get_expr", "pg_get_constraintdef", "pg_get_indexdef", "pg_get_viewdef", "pg_get_triggerdef",
        "pg_get_functiondef", "pg_get_function_arguments", "pg_get_function_result",
        "pg_get_function_identity_arguments", "pg_get_userbyid", "pg_get_serial_sequence", "pg_get_keywords",
        "pg_get_partkeydef", "pg_get_statisticsobjdef", "pg_get_ruledef", "pg_table_is_visible",
        "pg_type_is_visible", "pg_function_is_visible", "pg_opclass_is_visible", "pg_collation_is_visible",
        "pg_encoding_to_char", "pg_char_to_encoding", "has_table_privilege", "has_schema_privilege",
        "has_column_privilege", "has_any_column_privilege", "has_database_privilege", "has_function_privilege",
        "has_sequence_privilege", "has_type_privilege", "has_language_privilege", "pg_has_role",
        "pg_column_size", "pg_size_pretty", "pg_size_bytes", "pg_input_is_valid",
        "array_in", "textlen", "num_nulls", "num_nonnulls", "pg_index_column_has_property",
        "pg_index_has_property", "pg_indexam_has_property", "pg_describe_object", "pg_identify_object",
        "pg_get_object_address", "pg_relation_is_updatable", "pg_column_is_updatable",
    }
)  # fmt: skip
# Server-instance or backend views: a read of them answers for the server that runs it.
_BACKEND_LOCAL_RELS: Final = frozenset(
    {
        "pg_locks", "pg_prepared_statements", "pg_cursors", "pg_prepared_xacts", "pg_replication_slots",
        "pg_settings", "pg_file_settings", "pg_hba_file_rules", "pg_ident_file_mappings", "pg_shmem_allocations",
        "pg_backend_memory_contexts", "pg_replication_origin_status", "pg_wait_events", "pg_config",
    }
)  # fmt: skip
_BACKEND_LOCAL_REL_PREFIXES: Final = ("pg_stat_", "pg_statio_")
# SHOW of these reads session state the proxy replays to every backend of the session; any other setting
# (server_version, port, shared_buffers, ALL...) may differ between servers.
_SESSION_GUCS: Final = frozenset(
    {
        "search_path", "timezone", "datestyle", "intervalstyle", "client_encoding", "standard_conforming_strings",
        "transaction_isolation", "transaction_read_only", "transaction_deferrable", "default_transaction_isolation",
        "default_transaction_read_only", "default_transaction_deferrable", "statement_timeout", "lock_timeout",
        "idle_in_transaction_session_timeout", "idle_session_timeout", "application_name", "extra_float_digits",
        "bytea_output", "client_min_messages", "row_security", "work_mem", "maintenance_work_mem", "role",
        "session_authorization", "lc_monetary", "lc_numeric", "lc_time", "lc_messages", "timezone_abbreviations",
        "xmlbinary", "xmloption", "default_text_search_config", "enable_seqscan", "jit", "synchronous_commit",
        "escape_string_warning", "array_nulls", "backslash_quote", "integer_datetimes", "is_superuser",
        "max_identifier_length", "server_encoding", "check_function_bodies", "constraint_exclusion",
        "default_tablespace", "temp_tablespaces", "plan_cache_mode", "random_page_cost",
    }
)  # fmt: skip

_TX_OPS: Final[dict[str, TxOp]] = {
    "TRANS_STMT_BEGIN": TxOp.BEGIN,
    "TRANS_STMT_START": TxOp.BEGIN,
    "TRANS_STMT_COMMIT": TxOp.COMMIT,
    "TRANS_STMT_ROLLBACK": TxOp.ROLLBACK,
    "TRANS_STMT_SAVEPOINT": TxOp.SAVEPOINT,
    "TRANS_STMT_RELEASE": TxOp.RELEASE,
    "TRANS_STMT_ROLLBACK_TO": TxOp.ROLLBACK_TO,
    "TRANS_STMT_PREPARE": TxOp.PREPARE,
    "TRANS_STMT_COMMIT_PREPARED": TxOp.COMMIT_PREPARED,
    "TRANS_STMT_ROLLBACK_PREPARED": TxOp.ROLLBACK_PREPARED,
}
_DML: Final = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_DDL_PREFIXES: Final = (
    "Create", "Alter", "Drop", "Define", "Rename", "Grant", "Comment", "SecLabel", "Reassign", "Import", "Rule",
    "Composite", "Index", "View",
)  # fmt: skip
_UTILITY: Final = frozenset({"VacuumStmt", "CheckPointStmt", "ReindexStmt", "ClusterStmt", "AlterSystemStmt"})
_DROP_TABLE_LIKE: Final = frozenset(
    {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE"}
)
# Nodes whose children hold no table or function reference: not walked (the walk is the analyzer's cost).
_LEAVES: Final = frozenset(
    {
        "ColumnRef", "A_Const", "String", "Integer", "Float", "Boolean", "BitString", "ParamRef", "A_Star",
        "TypeName", "SQLValueFunction", "Alias", "LockingClause", "RoleSpec", "CTESearchClause", "CTECycleClause",
    }
)  # fmt: skip
# Everything the walk treats specially: one set lookup keeps the common node on the fast path.
_SPECIAL: Final = _LEAVES | _DML | {"RangeVar", "FuncCall", "SelectStmt", "CopyStmt"}
_CURSOR_OPT_HOLD: Final = 0x0020  # parsenodes.h
_MAX_NESTING: Final = 3  # DO blocks analysed inside DO blocks
_TRUE_WORDS: Final = frozenset({"t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"})
_FALSE_WORDS: Final = frozenset({"f", "fa", "fal", "fals", "false", "n", "no", "of", "off", "0"})
_HINT_QUICK: Final = re.compile(r"pgshift", re.IGNORECASE)
_HINT: Final = re.compile(r"pgshift:route\s*=\s*([A-Za-z0-9_.\-]+)", re.IGNORECASE)


# Node type names, plus the list wrappers libpg_query's JSON uses where pglast has plain tuples.
_NODE_NAMES: Final = frozenset(
    name
    for name in dir(_pg_ast)
    if isinstance(getattr(_pg_ast, name), type) and issubclass(getattr(_pg_ast, name), _pg_ast.Node)
) | {"List", "IntList", "OidList"}


def _field_types(names: frozenset[str]) -> dict[str, dict[str, str]]:
    """Map node type → {field: node type} for fields that hold ONE specific node type.

    libpg_query's JSON writes such fields without the {"Type": ...} wrapper it uses for generic Node fields,
    so the walker needs the type from the schema; pglast exposes it as each slot's C type.
    """
    result: dict[str, dict[str, str]] = {}
    for name in sorted(names):
        slots = getattr(getattr(_pg_ast, name, None), "__slots__", None)
        if not isinstance(slots, dict):
            continue
        for attr, info in slots.items():
            c_type = str(getattr(info, "c_type", ""))
            target = c_type[:-1]
            if c_type.endswith("*") and target in names and target != "Node":
                result.setdefault(name, {})[str(attr)] = target
    return result


_FIELD_TYPES: Final = _field_types(_NODE_NAMES)
_NO_FIELDS: Final[dict[str, str]] = {}
_NO_CTES: Final[frozenset[str]] = frozenset()
_NO_SKIP: Final[frozenset[str]] = frozenset()
_SELECT_SKIP: Final = frozenset({"withClause", "intoClause", "lockingClause"})
_DML_SKIP: Final = frozenset({"withClause", "relation"})
_COPY_SKIP: Final = frozenset({"relation"})

_Fields: TypeAlias = dict[str, object]
_Item: TypeAlias = tuple[object, str | None, bool, frozenset[str], bool]


def _unwrap(node: object) -> tuple[str, _Fields]:
    """A wrapped node {"Type": {fields}} → ("Type", fields); anything else → ("", {})."""
    if isinstance(node, dict) and len(node) == 1:
        ((key, inner),) = node.items()
        if isinstance(inner, dict) and key in _NODE_NAMES:
            return key, inner
    return "", {}


def _sval(node: object) -> str | None:
    """The text of a String node (wrapped or not)."""
    typ, fields = _unwrap(node)
    if typ == "String":
        node = fields
    if isinstance(node, dict):
        value = node.get("sval")
        if isinstance(value, str):
            return value
    return None


def _word_bool(text: str) -> bool | None:
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    return None


def _const_bool(node: object) -> bool | None:
    """The value of a boolean constant argument, or None when it is not a constant the analyzer can read."""
    typ, fields = _unwrap(node)
    if typ == "TypeCast":
        type_name = fields.get("typeName")  # a TypeName* field: unwrapped in the JSON
        names = [_sval(n) for n in _as_list(type_name.get("names"))] if isinstance(type_name, dict) else []
        if names and names[-1] in ("bool", "boolean"):
            return _const_bool(fields.get("arg"))
        return None
    if typ != "A_Const" or fields.get("isnull"):
        return None
    boolval = fields.get("boolval")
    if isinstance(boolval, dict):
        return bool(boolval.get("boolval", False))
    text = _sval(fields.get("sval"))
    return _word_bool(text) if text is not None else None


def _option_true(arg: object) -> bool:
    """Whether a DefElem option such as EXPLAIN's ANALYZE is on (absent argument means on)."""
    if arg is None:
        return True
    typ, fields = _unwrap(arg)
    if typ == "Boolean":
        return bool(fields.get("boolval", False))
    if typ == "Integer":
        return bool(fields.get("ival", 0))
    text = _sval(arg)
    if text is not None:
        word = _word_bool(text)
        return True if word is None else word  # Postgres rejects other words; assume it runs
    return True


def _as_list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _is_temp(rel: object) -> bool:
    if not isinstance(rel, dict):
        return False
    schema = rel.get("schemaname")
    return rel.get("relpersistence") == "t" or (isinstance(schema, str) and schema.lower().startswith("pg_temp"))


class _Analyzer:
    """Accumulates the facts of one analyze() call over all its statements."""

    def __init__(self) -> None:
        self.tables_read: set[str] = set()
        self.tables_written: set[str] = set()
        self.functions: set[str] = set()
        self.unknown: set[str] = set()
        self.pins: set[Pin] = set()
        self.volatile = False
        self.locking = False
        self.writable_cte = False
        self.select_into = False
        self.backend_local = False
        self.session_setting = False
        self.deallocates: list[str] = []
        self.tx_op: TxOp | None = None
        self.read_only_tx = False
        self.dml = 0  # executed INSERT/UPDATE/DELETE/MERGE nodes seen so far (a SELECT holding one is a write)
        self.nesting = 0  # > 0 while analysing the statements of a DO block

    # -- statements ------------------------------------------------------------------------------------------------
    def statement(self, node: object) -> Kind:
        typ, fields = _unwrap(node)
        handler = _HANDLERS.get(typ)
        if handler is not None:
            return handler(self, typ, fields)
        if typ in _UTILITY:
            self.walk(fields, typ, write=True, execd=False)
            return Kind.UTILITY
        if typ.startswith(_DDL_PREFIXES):
            self.walk(fields, typ, write=True, execd=False)
            return Kind.DDL
        return Kind.UNKNOWN

    def _select(self, typ: str, f: _Fields) -> Kind:
        before = self.dml
        self.walk(f, typ, write=False, execd=True)
        if self.dml > before:
            return Kind.WRITE
        # SELECT INTO is CREATE TABLE AS in disguise (Postgres' log_statement counts both as ddl).
        return Kind.DDL if f.get("intoClause") is not None else Kind.READ

    def _dml(self, typ: str, f: _Fields) -> Kind:
        self.walk(f, typ, write=False, execd=True)
        return Kind.WRITE

    def _write_rels(self, typ: str, f: _Fields) -> Kind:
        """TRUNCATE, LOCK, REFRESH MATERIALIZED VIEW: every relation named is written (needs the primary)."""
        self.walk(f, typ, write=True, execd=True)
        return Kind.WRITE

    def _explain(self, typ: str, f: _Fields) -> Kind:
        query = f.get("query")
        analyze = False
        for option in _as_list(f.get("options")):
            option_type, opt = _unwrap(option)
            if option_type == "DefElem" and opt.get("defname") == "analyze":
                analyze = _option_true(opt.get("arg"))
        if analyze:  # EXPLAIN ANALYZE runs the statement
            return self.statement(query)
        if _unwrap(query)[0] == "ExecuteStmt":
            return Kind.UNKNOWN  # the prepared statement exists only where it was prepared
        self.walk(query, None, write=False, execd=False)
        return Kind.READ

    def _declare(self, typ: str, f: _Fields) -> Kind:
        options = f.get("options")
        if isinstance(options, int) and options & _CURSOR_OPT_HOLD:
            self.pins.add(Pin.CURSOR_WITH_HOLD)
        return self.statement(f.get("query"))

    def _copy(self, typ: str, f: _Fields) -> Kind:
        server_side = f.get("filename") is not None or bool(f.get("is_program"))
        if f.get("is_from"):
            self.walk(f, typ, write=True, execd=True)
            return Kind.WRITE if server_side else Kind.COPY_IN
        before = self.dml
        self.walk(f, typ, write=False, execd=True)
        if self.dml > before:  # COPY (DELETE ... RETURNING *) TO STDOUT
            return Kind.WRITE
        return Kind.UTILITY if server_side else Kind.COPY_OUT

    def _prepare(self, typ: str, f: _Fields) -> Kind:
        self.pins.add(Pin.PREPARE)
        self.walk(f.get("query"), None, write=False, execd=False)
        return Kind.SESSION

    def _call(self, typ: str, f: _Fields) -> Kind:
        self.walk(f, typ, write=False, execd=True)
        return Kind.WRITE

    def _do(self, typ: str, f: _Fields) -> Kind:
        body: str | None = None
        language = "plpgsql"
        for arg in _as_list(f.get("args")):
            arg_type, opt = _unwrap(arg)
            if arg_type != "DefElem":
                continue
            if opt.get("defname") == "as":
                body = _sval(opt.get("arg"))
            elif opt.get("defname") == "language":
                language = (_sval(opt.get("arg")) or language).lower()
        if body is not None and language == "plpgsql":
            self._plpgsql_body(body)
        return Kind.WRITE

    def _plpgsql_body(self, body: str) -> None:
        """Find session state a DO block leaves behind (temp tables, LISTEN, SET, set_config...)."""
        if self.nesting >= _MAX_NESTING:
            self.pins.add(Pin.UNKNOWN_SESSION_STATE)
            return
        tag = "$pgshift$"
        while tag in body:
            tag = tag[:-1] + "_$"
        source = f"CREATE FUNCTION pg_temp.pgshift_do() RETURNS void LANGUAGE plpgsql AS {tag}{body}{tag}"
        try:
            tree: object = json.loads(_pg_parser.parse_plpgsql_json(source))
        except Exception:
            return  # the server rejects the block as well: it leaves no state
        texts, dynamic = _plpgsql_queries(tree)
        if dynamic:  # EXECUTE of a computed string may do anything
            self.pins.add(Pin.UNKNOWN_SESSION_STATE)
        self.nesting += 1
        try:
            for text in texts:
                try:
                    statements = _parse(text)
                except Exception:
                    continue  # an expression our rewrite cannot express as SQL: nothing to learn from it
                for statement in statements:
                    self.statement(statement)
        finally:
            self.nesting -= 1

    def _set(self, typ: str, f: _Fields) -> Kind:
        transactional = bool(f.get("is_local")) or (f.get("kind") == "VAR_SET_MULTI" and f.get("name") == "TRANSACTION")
        if not transactional:
            if self.nesting:
                self.pins.add(Pin.UNKNOWN_SESSION_STATE)  # a SET inside a DO block cannot be replayed as a SET
            else:
                self.session_setting = True
        return Kind.SESSION

    def _show(self, typ: str, f: _Fields) -> Kind:
        name = f.get("name")
        if not (isinstance(name, str) and name.lower() in _SESSION_GUCS):
            self.backend_local = True
        return Kind.READ

    def _transaction(self, typ: str, f: _Fields) -> Kind:
        op = _TX_OPS.get(str(f.get("kind")))
        if op is None:
            return Kind.UNKNOWN
        if self.tx_op is None and not self.nesting:
            self.tx_op = op
            if op is TxOp.BEGIN:
                for option in _as_list(f.get("options")):
                    option_type, opt = _unwrap(option)
                    if option_type == "DefElem" and opt.get("defname") == "transaction_read_only":
                        _, const = _unwrap(opt.get("arg"))
                        ival = const.get("ival")
                        self.read_only_tx = isinstance(ival, dict) and bool(ival.get("ival", 0))
        return Kind.TRANSACTION

    def _session(self, typ: str, f: _Fields) -> Kind:
        return Kind.SESSION

    def _listen(self, typ: str, f: _Fields) -> Kind:
        self.pins.add(Pin.LISTEN)
        return Kind.SESSION

    def _load(self, typ: str, f: _Fields) -> Kind:
        self.pins.add(Pin.UNKNOWN_SESSION_STATE)
        return Kind.SESSION

    def _discard(self, typ: str, f: _Fields) -> Kind:
        # DISCARD resets more than the session can replay (settings, plans, temp tables): it pins.
        self.pins.add(Pin.UNKNOWN_SESSION_STATE)
        return Kind.SESSION

    def _deallocate(self, typ: str, f: _Fields) -> Kind:
        # Not transactional, and it drops protocol-level statements as well: the session marks
        # them closed (and makes sure a named one exists where this runs) instead of pinning.
        name = f.get("name")
        self.deallocates.append("*" if f.get("isall") or not isinstance(name, str) else name)
        return Kind.SESSION

    def _unknown(self, typ: str, f: _Fields) -> Kind:
        return Kind.UNKNOWN

    def _write(self, typ: str, f: _Fields) -> Kind:
        return Kind.WRITE

    def _create_temp_capable(self, typ: str, f: _Fields) -> Kind:
        rel = f.get(_CREATED_RELATION[typ])
        if _is_temp(rel) and f.get("oncommit") != "ONCOMMIT_DROP":
            self.pins.add(Pin.TEMP_TABLE)
        self.walk(f, typ, write=True, execd=False)
        return Kind.DDL

    def _create_table_as(self, typ: str, f: _Fields) -> Kind:
        into = f.get("into")
        if isinstance(into, dict):
            rel = into.get("rel")
            if _is_temp(rel) and into.get("onCommit") != "ONCOMMIT_DROP":
                self.pins.add(Pin.TEMP_TABLE)
            if isinstance(rel, dict):
                self.table(rel, write=True, ctes=_NO_CTES)
            executes = not into.get("skipData")
        else:
            executes = True
        self.walk(f.get("query"), None, write=False, execd=executes)
        return Kind.DDL

    def _create_function(self, typ: str, f: _Fields) -> Kind:
        names = [_sval(n) for n in _as_list(f.get("funcname"))]
        if len(names) > 1 and (names[0] or "").lower().startswith("pg_temp"):
            self.pins.add(Pin.TEMP_TABLE)  # a temporary function lives in this session's temp schema
        self.walk(f, typ, write=True, execd=False)
        return Kind.DDL

    def _drop(self, typ: str, f: _Fields) -> Kind:
        if f.get("removeType") in _DROP_TABLE_LIKE:
            for obj in _as_list(f.get("objects")):
                typ, fields = _unwrap(obj)
                parts = [_sval(item) for item in _as_list(fields.get("items"))] if typ == "List" else []
                if parts and all(parts):
                    self.tables_written.add(".".join(p for p in parts if p).lower())
        return Kind.DDL

    # -- expressions -----------------------------------------------------------------------------------------------
    def table(self, rel: _Fields, *, write: bool, ctes: frozenset[str]) -> None:
        name = rel.get("relname")
        if not isinstance(name, str):
            return
        schema = rel.get("schemaname")
        catalog = rel.get("catalogname")
        if not write and schema is None and catalog is None and name in ctes:
            return  # a CTE of an enclosing WITH, not a table
        parts = [p for p in (catalog, schema, name) if isinstance(p, str)]
        qualified = ".".join(parts).lower()
        (self.tables_written if write else self.tables_read).add(qualified)
        base = name.lower()
        if (schema is None or schema == "pg_catalog") and (
            base in _BACKEND_LOCAL_RELS or base.startswith(_BACKEND_LOCAL_REL_PREFIXES)
        ):
            self.backend_local = True

    def function(self, f: _Fields, *, execd: bool) -> None:
        parts = [_sval(n) or "" for n in _as_list(f.get("funcname"))]
        if not parts:
            return
        name = ".".join(parts).lower()
        base = parts[-1].lower()
        self.functions.add(name)
        if not execd:
            return  # planned or stored, not run: volatility and session effects do not apply
        if base in _ADVISORY_SESSION_LOCKS:
            self.pins.add(Pin.ADVISORY_LOCK)
        elif base == "set_config":
            args = _as_list(f.get("args"))
            if len(args) < 3 or _const_bool(args[2]) is not True:
                self.pins.add(Pin.SET_CONFIG)  # is_local false or unknown: the setting outlives the transaction
        elif base in _SESSION_STATE_FUNCS:
            self.pins.add(Pin.UNKNOWN_SESSION_STATE)
        builtin = len(parts) == 1 or (len(parts) == 2 and parts[0].lower() == "pg_catalog")
        if builtin and (base in _BACKEND_LOCAL_FUNCS or base.startswith(_BACKEND_LOCAL_FUNC_PREFIXES)):
            self.backend_local = True
        elif base in _VOLATILE or base.startswith(_VOLATILE_PREFIXES):
            self.volatile = True
        elif not (builtin and base in _STABLE):
            self.unknown.add(name)

    def walk(self, root: object, typ: str | None, *, write: bool, execd: bool) -> None:
        """Visit a JSON parse tree iteratively (deep expressions must not exhaust Python's stack).

        ``write``: a RangeVar met here is a table written (DDL and DML targets); ``execd``: functions met here
        run (False under EXPLAIN without ANALYZE, PREPARE, or a DDL body).
        """
        stack: list[_Item] = [(root, typ, write, _NO_CTES, execd)]
        push = stack.append
        pop = stack.pop
        while stack:
            value, typ, write, ctes, execd = pop()
            if type(value) is list:
                for item in value:
                    if type(item) is dict or type(item) is list:
                        push((item, None, write, ctes, execd))
                continue
            if type(value) is not dict:
                continue
            if typ is None and len(value) == 1:
                for key, inner in value.items():  # the {"Type": {fields}} wrapper of a generic Node field
                    if type(inner) is dict and key in _NODE_NAMES:
                        typ = key
                        value = inner
            if typ in _SPECIAL:
                if typ in _LEAVES:
                    continue
                if typ == "RangeVar":
                    self.table(value, write=write, ctes=ctes)
                    continue
                write, ctes, skip = self._special(typ, value, write, ctes, execd, push)
            else:
                skip = _NO_SKIP
            types = _FIELD_TYPES.get(typ, _NO_FIELDS) if typ is not None else _NO_FIELDS
            for key, child in value.items():
                if (type(child) is dict or type(child) is list) and key not in skip:
                    push((child, types.get(key), write, ctes, execd))

    def _special(
        self, typ: str, value: _Fields, write: bool, ctes: frozenset[str], execd: bool, push: Callable[[_Item], None]
    ) -> tuple[bool, frozenset[str], frozenset[str]]:
        """Node types with their own rules: returns the walk's (write, ctes) for the children and fields to skip."""
        if typ == "FuncCall":
            self.function(value, execd=execd)
            return write, ctes, _NO_SKIP
        if typ == "SelectStmt":
            ctes = self._with(value.get("withClause"), ctes, execd, push)
            if execd:
                if value.get("lockingClause"):
                    self.locking = True
                into = value.get("intoClause")
                if isinstance(into, dict):
                    self.select_into = True
                    rel = into.get("rel")
                    if isinstance(rel, dict):
                        self.table(rel, write=True, ctes=_NO_CTES)
                        if _is_temp(rel) and into.get("onCommit") != "ONCOMMIT_DROP":
                            self.pins.add(Pin.TEMP_TABLE)
            return False, ctes, _SELECT_SKIP
        if typ in _DML:
            ctes = self._with(value.get("withClause"), ctes, execd, push)
            rel = value.get("relation")
            if isinstance(rel, dict):
                self.table(rel, write=execd, ctes=_NO_CTES)  # EXPLAIN without ANALYZE writes nothing
            if execd:
                self.dml += 1
            return False, ctes, _DML_SKIP
        # CopyStmt
        rel = value.get("relation")
        if isinstance(rel, dict):
            self.table(rel, write=write, ctes=_NO_CTES)
        return False, ctes, _COPY_SKIP

    def _with(self, clause: object, ctes: frozenset[str], execd: bool, push: Callable[[_Item], None]) -> frozenset[str]:
        """Queue the CTE bodies of a WITH clause; return the names visible in the statement's body."""
        if not isinstance(clause, dict):
            return ctes
        items = _as_list(clause.get("ctes"))
        recursive = bool(clause.get("recursive"))
        names: list[str] = []
        bodies: list[object] = []
        for item in items:
            typ, cte = _unwrap(item)
            name = cte.get("ctename")
            names.append(name if isinstance(name, str) else "")
            bodies.append(cte.get("ctequery") if typ == "CommonTableExpr" else item)
        visible = ctes | frozenset(names)
        for index, body in enumerate(bodies):
            if execd and _unwrap(body)[0] in _DML:
                self.writable_cte = True
            # A non-recursive CTE sees only the CTEs before it: `WITH t AS (SELECT * FROM t)` reads table t.
            scope = visible if recursive else ctes | frozenset(names[:index])
            push((body, None, False, scope, execd))
        return visible


_Handler = Callable[[_Analyzer, str, _Fields], Kind]
_CREATED_RELATION: Final = {"CreateStmt": "relation", "ViewStmt": "view", "CreateSeqStmt": "sequence"}
_HANDLERS: Final[dict[str, _Handler]] = {
    "SelectStmt": _Analyzer._select,
    "InsertStmt": _Analyzer._dml,
    "UpdateStmt": _Analyzer._dml,
    "DeleteStmt": _Analyzer._dml,
    "MergeStmt": _Analyzer._dml,
    "TruncateStmt": _Analyzer._write_rels,
    "LockStmt": _Analyzer._write_rels,
    "RefreshMatViewStmt": _Analyzer._write_rels,
    "NotifyStmt": _Analyzer._write,
    "CallStmt": _Analyzer._call,
    "DoStmt": _Analyzer._do,
    "ExplainStmt": _Analyzer._explain,
    "DeclareCursorStmt": _Analyzer._declare,
    "CopyStmt": _Analyzer._copy,
    "PrepareStmt": _Analyzer._prepare,
    "ExecuteStmt": _Analyzer._unknown,  # runs whatever was prepared
    "FetchStmt": _Analyzer._unknown,  # FETCH/MOVE: the cursor lives on one backend
    "VariableSetStmt": _Analyzer._set,
    "VariableShowStmt": _Analyzer._show,
    "TransactionStmt": _Analyzer._transaction,
    "DiscardStmt": _Analyzer._discard,
    "ListenStmt": _Analyzer._listen,
    "UnlistenStmt": _Analyzer._session,
    "DeallocateStmt": _Analyzer._deallocate,
    "ClosePortalStmt": _Analyzer._session,
    "ConstraintsSetStmt": _Analyzer._session,
    "LoadStmt": _Analyzer._load,
    "CreateStmt": _Analyzer._create_temp_capable,
    "ViewStmt": _Analyzer._create_temp_capable,
    "CreateSeqStmt": _Analyzer._create_temp_capable,
    "CreateTableAsStmt": _Analyzer._create_table_as,
    "CreateFunctionStmt": _Analyzer._create_function,
    "DropStmt": _Analyzer._drop,
}


def _parse(sql: str) -> list[object]:
    """The statements of a text as libpg_query JSON trees (pglast's JSON API: ~5x cheaper than its AST objects)."""
    tree: object = json.loads(_pg_parser.parse_sql_json(sql))
    if not isinstance(tree, dict):
        return []
    return [raw.get("stmt") for raw in _as_list(tree.get("stmts")) if isinstance(raw, dict)]


def _plpgsql_queries(tree: object) -> tuple[list[str], bool]:
    """The SQL texts a PL/pgSQL function body runs, and whether it also runs dynamic SQL."""
    texts: list[str] = []
    dynamic = False
    stack: list[object] = [tree]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
            continue
        if not isinstance(value, dict):
            continue
        if "PLpgSQL_stmt_dynexecute" in value or "PLpgSQL_stmt_dynfors" in value or "dynquery" in value:
            dynamic = True
        expr = value.get("PLpgSQL_expr")
        if isinstance(expr, dict):
            query = expr.get("query")
            mode = expr.get("parseMode", 0)
            if isinstance(query, str):
                if mode == 0:  # RAW_PARSE_DEFAULT: a whole statement
                    texts.append(query)
                elif mode == 2:  # RAW_PARSE_PLPGSQL_EXPR: an expression
                    texts.append("SELECT " + query)
                elif mode in (3, 4, 5):  # RAW_PARSE_PLPGSQL_ASSIGNn: "target := expression"
                    _, sep, rhs = query.partition(":=")
                    if not sep:
                        _, sep, rhs = query.partition("=")
                    if sep:
                        texts.append("SELECT " + rhs)
            continue
        stack.extend(v for v in value.values() if isinstance(v, dict | list))
    return texts, dynamic


def _hint(sql: str) -> str | None:
    """The backend named by a /* pgshift:route=NAME */ or -- pgshift:route=NAME comment (not inside a literal)."""
    if _HINT_QUICK.search(sql) is None:
        return None
    try:
        comments = _pg_parser.comments(sql)
    except Exception:
        return None  # the text does not even scan: no trustworthy comment
    for comment in comments:
        match = _HINT.search(str(comment.str))
        if match is not None:
            return match.group(1)
    return None


def _failed(sql: str, message: str) -> Analysis:
    try:
        hint = _hint(sql)
    except Exception:
        hint = None
    return Analysis(
        kind=Kind.UNKNOWN,
        statement_count=0,
        tables_read=frozenset(),
        tables_written=frozenset(),
        functions=frozenset(),
        volatile=False,
        unknown_functions=frozenset(),
        locking=False,
        writable_cte=False,
        select_into=False,
        tx_op=None,
        read_only_tx=False,
        pins=frozenset(),
        session_setting=False,
        hint=hint,
        parse_error=message or "unparsable statement",
    )


def analyze(sql: str) -> Analysis:
    """Analyse one SQL text (one or more statements). Never raises: any failure is Kind.UNKNOWN + parse_error."""
    if "\x00" in sql:
        # The parser stops at a NUL (C string) and would vouch for a prefix only: leave it to the primary.
        return _failed(sql, "statement text contains a NUL character")
    try:
        statements = _parse(sql)
    except Exception as exc:  # ParseError, but also e.g. UnicodeEncodeError for lone surrogates
        return _failed(sql, str(exc) or type(exc).__name__)
    try:
        analyzer = _Analyzer()
        kind = Kind.READ  # an empty query (only comments or semicolons) is answered alike everywhere
        for statement in statements:
            stmt_kind = analyzer.statement(statement)
            if _STRENGTH[stmt_kind] > _STRENGTH[kind]:
                kind = stmt_kind
        return Analysis(
            kind=kind,
            statement_count=len(statements),
            tables_read=frozenset(analyzer.tables_read),
            tables_written=frozenset(analyzer.tables_written),
            functions=frozenset(analyzer.functions),
            volatile=analyzer.volatile,
            unknown_functions=frozenset(analyzer.unknown),
            locking=analyzer.locking,
            writable_cte=analyzer.writable_cte,
            select_into=analyzer.select_into,
            tx_op=analyzer.tx_op,
            read_only_tx=analyzer.read_only_tx,
            pins=frozenset(analyzer.pins),
            session_setting=analyzer.session_setting,
            hint=_hint(sql),
            parse_error=None,
            backend_local=analyzer.backend_local,
            deallocates=tuple(analyzer.deallocates),
        )
    except Exception as exc:  # a defect in the walk (or RecursionError) must route to the primary, not fail
        return _failed(sql, f"analysis failed: {type(exc).__name__}: {exc}")
