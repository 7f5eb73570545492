"""Mirror plans: statement splitting, classification (NONE/TX/REPLAY/IMAGE/DDL/UNSAFE), IMAGE rewrites, Parse frames."""

from __future__ import annotations

import json
import struct

import pytest
from pglast import parser

from proxy.errors import ProtocolViolation
from proxy.mirror.model import ImageOp
from proxy.mirror.plan import (
    IMAGE_COLUMN,
    Action,
    PlanCache,
    StatementPlan,
    plan_sql,
    quote_ident,
    rewrite_parse,
)
from proxy.sql.analysis import TxOp


def one(sql: str, *, functions_write: bool = False) -> StatementPlan:
    plans = plan_sql(sql, functions_write=functions_write)
    assert len(plans) == 1, plans
    return plans[0]


def returning_targets(sql: str) -> list[str | None]:
    """The output column names of a statement's RETURNING list (None: unnamed), by parsing it."""
    (raw,) = json.loads(parser.parse_sql_json(sql))["stmts"]
    (stmt,) = raw["stmt"].values()
    return [item["ResTarget"].get("name") for item in stmt["returningClause"]["exprs"]]


# --- splitting ------------------------------------------------------------------------------------------------------


def test_multi_statement_text_is_split_into_exact_slices() -> None:
    plans = plan_sql("BEGIN; INSERT INTO t (a) VALUES (1);\n  UPDATE t SET a = 2 WHERE a = 1 ; COMMIT;")
    assert [p.sql for p in plans] == [
        "BEGIN",
        "INSERT INTO t (a) VALUES (1)",
        "UPDATE t SET a = 2 WHERE a = 1",
        "COMMIT",
    ]
    assert [p.action for p in plans] == [Action.TX, Action.IMAGE, Action.REPLAY, Action.TX]
    assert [p.tx_op for p in plans] == [TxOp.BEGIN, None, None, TxOp.COMMIT]


def test_slices_are_characters_even_when_offsets_are_utf8_bytes() -> None:
    plans = plan_sql("SELECT 'é'; DELETE FROM \"Tä\" WHERE a = 'ü'; SELECT '日本'")
    assert [p.sql for p in plans] == ["SELECT 'é'", "DELETE FROM \"Tä\" WHERE a = 'ü'", "SELECT '日本'"]
    assert plans[1].tables == ('"Tä"',)


def test_comments_inside_a_statement_stay_with_it() -> None:
    # The PostgreSQL 18 parser (pglast 8) starts a statement at its first token: a leading comment is
    # not part of it; one before its ';' is.
    plans = plan_sql("/* app */ DELETE FROM t WHERE /* x */ id = 1 -- why\n; SELECT 1; -- trailing")
    assert [p.sql for p in plans] == ["DELETE FROM t WHERE /* x */ id = 1 -- why", "SELECT 1"]


def test_fingerprint_is_pglast_fingerprint_of_the_slice() -> None:
    plans = plan_sql("SELECT 1; UPDATE t SET a = $1 WHERE id = $2")
    assert [p.fingerprint for p in plans] == [parser.fingerprint("SELECT 1"), parser.fingerprint(plans[1].sql)]
    assert plan_sql("UPDATE t SET a = 5 WHERE id = 7")[0].fingerprint == plans[1].fingerprint


@pytest.mark.parametrize("sql", ["", "   ", ";", " ;; ", "-- only a comment", "/* nothing */ ;"])
def test_texts_without_statements_plan_nothing(sql: str) -> None:
    assert plan_sql(sql) == ()


def test_unparsable_text_is_one_none_plan_with_the_parser_message() -> None:
    (plan,) = plan_sql("INSERT INTO t VALUES (1); UPDAT t SET a = 1")
    assert plan.action is Action.NONE
    assert plan.sql == "INSERT INTO t VALUES (1); UPDAT t SET a = 1"
    assert plan.fingerprint == ""
    assert plan.tables == ()
    assert plan.reason.startswith("parse error: ") and "UPDAT" in plan.reason


def test_text_with_a_nul_is_a_parse_error() -> None:
    (plan,) = plan_sql("SELECT 1\x00; DELETE FROM t")
    assert plan.action is Action.NONE
    assert plan.reason.startswith("parse error")


# --- transactions ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "op"),
    [
        ("BEGIN", TxOp.BEGIN),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", TxOp.BEGIN),
        ("START TRANSACTION READ WRITE", TxOp.BEGIN),
        ("COMMIT", TxOp.COMMIT),
        ("END", TxOp.COMMIT),
        ("ROLLBACK", TxOp.ROLLBACK),
        ("ABORT", TxOp.ROLLBACK),
        ("PREPARE TRANSACTION 'gid'", TxOp.PREPARE),
        ("COMMIT PREPARED 'gid'", TxOp.COMMIT_PREPARED),
        ("ROLLBACK PREPARED 'gid'", TxOp.ROLLBACK_PREPARED),
    ],
)
def test_transaction_control(sql: str, op: TxOp) -> None:
    plan = one(sql)
    assert (plan.action, plan.tx_op, plan.savepoint, plan.tables) == (Action.TX, op, None, ())


@pytest.mark.parametrize(
    ("sql", "op", "name"),
    [
        ("SAVEPOINT sp1", TxOp.SAVEPOINT, "sp1"),
        ("SAVEPOINT My_Point", TxOp.SAVEPOINT, "my_point"),  # unquoted: folded to lower case
        ('SAVEPOINT "My Point"', TxOp.SAVEPOINT, "My Point"),  # quoted: kept
        ("RELEASE SAVEPOINT SP1", TxOp.RELEASE, "sp1"),
        ("RELEASE sp1", TxOp.RELEASE, "sp1"),
        ("ROLLBACK TO SAVEPOINT sp1", TxOp.ROLLBACK_TO, "sp1"),
        ('ROLLBACK TO "X"', TxOp.ROLLBACK_TO, "X"),
    ],
)
def test_savepoints_carry_the_folded_name(sql: str, op: TxOp, name: str) -> None:
    plan = one(sql)
    assert (plan.action, plan.tx_op, plan.savepoint) == (Action.TX, op, name)


# --- INSERT ---------------------------------------------------------------------------------------------------------


def test_plain_insert_is_an_image_because_of_defaults() -> None:
    plan = one("INSERT INTO t (a, b) VALUES ($1, $2)")
    assert plan.action is Action.IMAGE
    assert plan.op is ImageOp.INSERT
    assert plan.reason == "omitted columns may have defaults"
    assert (plan.table, plan.tables, plan.conflict, plan.returning) == ("t", ("t",), None, False)
    assert plan.rewritten == f"INSERT INTO t (a, b) VALUES ($1, $2)\nRETURNING row_to_json(t.*)::text AS {IMAGE_COLUMN}"


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("INSERT INTO t (a, at) VALUES (1, now())", "calls now()"),
        ("INSERT INTO t (id) VALUES (gen_random_uuid())", "calls gen_random_uuid()"),
        ("INSERT INTO t (id) VALUES (nextval('s'))", "calls nextval()"),
        ("INSERT INTO t (at) VALUES (CURRENT_TIMESTAMP)", "calls current_timestamp"),
        ("INSERT INTO t (d) VALUES ('today'::date)", "uses the time literal 'today'"),
        ("INSERT INTO t (a) VALUES (my_func(1))", "calls my_func()"),
        ("INSERT INTO t (a) SELECT a FROM accounts", "reads other tables: accounts"),
        ("INSERT INTO t SELECT * FROM a JOIN public.b USING (id)", "reads other tables: a, public.b"),
        ("INSERT INTO t (a, b) VALUES (1, DEFAULT)", "uses DEFAULT"),
        ("INSERT INTO t DEFAULT VALUES", "omitted columns may have defaults"),
        ("INSERT INTO t SELECT * FROM t WHERE a > 1", "omitted columns may have defaults"),  # target only
        ("INSERT INTO t (a, b) VALUES (now(), random())", "calls now()"),  # the first cause in the text
    ],
)
def test_insert_reason_names_the_first_concrete_cause(sql: str, reason: str) -> None:
    plan = one(sql)
    assert (plan.action, plan.op, plan.reason) == (Action.IMAGE, ImageOp.INSERT, reason)


def test_insert_on_conflict_do_nothing_is_insert() -> None:
    for sql in (
        "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING",
        "INSERT INTO t VALUES (1) ON CONFLICT (a) DO NOTHING",
    ):
        plan = one(sql)
        assert (plan.action, plan.op, plan.conflict) == (Action.IMAGE, ImageOp.INSERT, None)


@pytest.mark.parametrize(
    ("sql", "conflict"),
    [
        ("INSERT INTO users (email) VALUES ($1) ON CONFLICT (email) DO UPDATE SET n = 1", "(email)"),
        ("INSERT INTO t VALUES (1, 2) ON CONFLICT (a, b) DO UPDATE SET c = excluded.c", "(a, b)"),
        (
            "INSERT INTO users VALUES ($1) ON CONFLICT ON CONSTRAINT users_email_key DO UPDATE SET n = 2",
            "ON CONSTRAINT users_email_key",
        ),
        ('INSERT INTO t VALUES (1) ON CONFLICT ON CONSTRAINT "T_pkey" DO UPDATE SET a = 1', 'ON CONSTRAINT "T_pkey"'),
        (
            "INSERT INTO t VALUES (1) ON CONFLICT (email) WHERE deleted_at IS NULL DO UPDATE SET a = 1",
            "(email) WHERE deleted_at IS NULL",
        ),
        ('INSERT INTO t VALUES (1) ON CONFLICT ("Email") DO UPDATE SET a = 1', '("Email")'),
    ],
)
def test_upsert_conflict_target(sql: str, conflict: str) -> None:
    plan = one(sql)
    assert (plan.action, plan.op, plan.conflict) == (Action.IMAGE, ImageOp.UPSERT, conflict)
    # the mirror builds "INSERT … ON CONFLICT <conflict> DO UPDATE …" from it: it must parse there
    parser.parse_sql(f"INSERT INTO t SELECT 1 ON CONFLICT {conflict} DO UPDATE SET a = 1")


def test_upsert_conflict_on_an_expression_index_parses() -> None:
    plan = one('INSERT INTO t VALUES (1) ON CONFLICT (lower(email) COLLATE "C", b DESC) DO UPDATE SET a = 1')
    assert plan.op is ImageOp.UPSERT
    assert plan.conflict is not None and "lower(email)" in plan.conflict and 'COLLATE "C"' in plan.conflict
    reparsed = parser.parse_sql(f"INSERT INTO t SELECT 1 ON CONFLICT {plan.conflict} DO NOTHING")
    original = parser.parse_sql('INSERT INTO t SELECT 1 ON CONFLICT (lower(email) COLLATE "C", b DESC) DO NOTHING')
    assert reparsed == original


def test_writable_cte_in_insert_is_unsafe() -> None:
    plan = one("WITH moved AS (DELETE FROM queue RETURNING *) INSERT INTO done SELECT * FROM moved")
    assert (plan.action, plan.reason) == (Action.UNSAFE, "writable CTE")
    assert plan.tables == ("done", "queue")
    assert plan.rewritten is None


# --- UPDATE / DELETE ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE t SET a = a + 1 WHERE id = $1",
        "UPDATE public.t SET name = lower($1), n = coalesce(n, 0) + 1 WHERE id = $2",
        "UPDATE t SET a = (SELECT max(a) FROM t) WHERE id = 1",  # reads only the target
        "DELETE FROM t WHERE id = 1",
        "DELETE FROM t WHERE id IN (SELECT id FROM t WHERE a < 0)",
        "WITH old AS (SELECT id FROM t WHERE a < 0) DELETE FROM t WHERE id IN (SELECT id FROM old)",
        "UPDATE t SET at = '2024-01-01'::timestamptz, tag = current_setting('app.tag') WHERE id = 1",
        "UPDATE t SET a = 1 WHERE id = 1 RETURNING id, a",
    ],
)
def test_deterministic_update_and_delete_replay(sql: str) -> None:
    plan = one(sql)
    assert plan.action is Action.REPLAY, plan.reason
    assert plan.rewritten is None and plan.op is None
    assert plan.tables in (("t",), ("public.t",))


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE t SET tag = current_user WHERE id = 1",  # on the mirror: the apply account
        "UPDATE t SET tag = session_user WHERE id = 1",
        "UPDATE t SET db = current_database() WHERE id = 1",
    ],
)
def test_who_and_where_the_statement_runs_is_captured_as_images(sql: str) -> None:
    assert one(sql).action is Action.IMAGE


@pytest.mark.parametrize(
    ("sql", "op", "reason"),
    [
        ("UPDATE t SET at = now() WHERE id = 1", ImageOp.UPDATE, "calls now()"),
        ("UPDATE t SET at = pg_catalog.clock_timestamp()", ImageOp.UPDATE, "calls pg_catalog.clock_timestamp()"),
        ("UPDATE t SET at = statement_timestamp()", ImageOp.UPDATE, "calls statement_timestamp()"),
        ("UPDATE t SET at = transaction_timestamp()", ImageOp.UPDATE, "calls transaction_timestamp()"),
        ("UPDATE t SET d = current_date", ImageOp.UPDATE, "calls current_date"),
        ("UPDATE t SET d = localtimestamp(3)", ImageOp.UPDATE, "calls localtimestamp"),
        ("UPDATE t SET at = 'now'", ImageOp.UPDATE, "uses the time literal 'now'"),
        ("UPDATE t SET r = random()", ImageOp.UPDATE, "calls random()"),
        ("UPDATE t SET u = uuid_generate_v4()", ImageOp.UPDATE, "calls uuid_generate_v4()"),
        ("UPDATE t SET x = txid_current()", ImageOp.UPDATE, "calls txid_current()"),
        ("UPDATE t SET a = app.score(a)", ImageOp.UPDATE, "calls app.score()"),
        ("UPDATE t SET a = DEFAULT WHERE id = 1", ImageOp.UPDATE, "uses DEFAULT"),
        ("UPDATE t SET a = u.a FROM u WHERE u.id = t.id", ImageOp.UPDATE, "reads other tables: u"),
        ("UPDATE t SET a = (SELECT b FROM accounts WHERE id = 1)", ImageOp.UPDATE, "reads other tables: accounts"),
        ("UPDATE t SET a = t2.a FROM t AS t2 WHERE t2.id = t.id + 1", ImageOp.UPDATE, "UPDATE … FROM"),
        ("UPDATE t SET s = (SELECT string_agg(n, ',') FROM t)", ImageOp.UPDATE, "string_agg() without ORDER BY"),
        ("DELETE FROM t USING accounts a WHERE a.id = t.id", ImageOp.DELETE, "reads other tables: accounts"),
        ("DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 10)", ImageOp.DELETE, "LIMIT/OFFSET"),
        ("DELETE FROM t WHERE ctid = '(0,1)'", ImageOp.DELETE, "uses the system column ctid"),
        ("DELETE FROM t WHERE at < now() - interval '1 day'", ImageOp.DELETE, "calls now()"),
        ("DELETE FROM t WHERE id = 1 RETURNING nextval('s')", ImageOp.DELETE, "calls nextval()"),
        ("DELETE FROM public.t WHERE id IN (SELECT id FROM t)", ImageOp.DELETE, "reads other tables: t"),
    ],
)
def test_nondeterministic_update_and_delete_are_images(sql: str, op: ImageOp, reason: str) -> None:
    plan = one(sql)
    assert (plan.action, plan.op) == (Action.IMAGE, op)
    assert plan.reason.startswith(reason), plan.reason
    assert plan.rewritten is not None
    parser.parse_sql(plan.rewritten)


def test_where_current_of_is_unsafe() -> None:
    for sql in ("UPDATE t SET a = 1 WHERE CURRENT OF c", "DELETE FROM t WHERE CURRENT OF c"):
        plan = one(sql)
        assert (plan.action, plan.reason, plan.tables) == (Action.UNSAFE, "WHERE CURRENT OF a cursor", ("t",))


@pytest.mark.parametrize(
    "sql",
    [
        "WITH d AS (DELETE FROM a RETURNING id) UPDATE t SET x = 1 WHERE id IN (SELECT id FROM d)",
        "WITH u AS (UPDATE a SET x = 1 RETURNING id) DELETE FROM t WHERE id IN (SELECT id FROM u)",
        "WITH i AS (INSERT INTO a VALUES (1) RETURNING *) SELECT * FROM i",
        "WITH s AS (SELECT 1), i AS (INSERT INTO a VALUES (1) RETURNING *) SELECT * FROM i, s",
    ],
)
def test_writable_cte_anywhere_is_unsafe(sql: str) -> None:
    plan = one(sql)
    assert (plan.action, plan.reason) == (Action.UNSAFE, "writable CTE")
    assert "a" in plan.tables


# --- the IMAGE rewrite ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "ref"),
    [
        ("INSERT INTO t VALUES (1)", "t"),
        ("INSERT INTO public.t VALUES (1)", "t"),
        ("INSERT INTO t AS x VALUES (1)", "x"),
        ('INSERT INTO public."Order" (id) VALUES ($1)', '"Order"'),
        ('INSERT INTO "user" VALUES (1)', '"user"'),
        ("UPDATE t x SET a = now()", "x"),
        ("UPDATE ONLY public.t AS x SET a = now()", "x"),
        ('UPDATE public."Order" SET at = now()', '"Order"'),
        ("DELETE FROM t AS x WHERE x.at < now()", "x"),
        ("DELETE FROM s.t WHERE at < now()", "t"),
    ],
)
def test_image_reference_is_the_alias_or_the_relation_name(sql: str, ref: str) -> None:
    plan = one(sql)
    assert plan.action is Action.IMAGE
    assert plan.rewritten == f"{sql}\nRETURNING row_to_json({ref}.*)::text AS {IMAGE_COLUMN}"
    assert returning_targets(plan.rewritten) == [IMAGE_COLUMN]


def test_image_table_is_as_written_and_quoted() -> None:
    plan = one('UPDATE Public."Order" SET at = now()')
    assert plan.table == 'public."Order"'
    assert plan.tables == ('public."Order"',)
    assert one('DELETE FROM "select" WHERE at < now()').table == '"select"'


def test_image_appends_to_returning_star() -> None:
    plan = one("INSERT INTO t (a) VALUES (1) RETURNING *")
    assert plan.returning is True
    assert plan.rewritten == f"INSERT INTO t (a) VALUES (1) RETURNING *\n, row_to_json(t.*)::text AS {IMAGE_COLUMN}"
    assert returning_targets(plan.rewritten) == [None, IMAGE_COLUMN]


def test_image_appends_to_a_returning_list() -> None:
    plan = one("UPDATE accounts a SET seen = now() WHERE a.id = $1 RETURNING id, name AS n")
    assert plan.returning is True
    assert plan.rewritten is not None
    assert plan.rewritten.endswith(f"RETURNING id, name AS n\n, row_to_json(a.*)::text AS {IMAGE_COLUMN}")
    assert returning_targets(plan.rewritten) == [None, "n", IMAGE_COLUMN]


def test_image_rewrite_ends_a_trailing_line_comment() -> None:
    for sql in ("INSERT INTO t VALUES (1) -- note", "INSERT INTO t VALUES (1) RETURNING id -- note"):
        plan = one(sql)
        assert plan.rewritten is not None
        assert plan.rewritten.startswith(sql + "\n")
        assert returning_targets(plan.rewritten)[-1] == IMAGE_COLUMN


def test_image_rewrite_keeps_parameters_literals_and_casts_verbatim() -> None:
    sql = "INSERT INTO t (a, b, c) VALUES ($1::int, E'x\\ny', $2) ON CONFLICT (a) DO UPDATE SET b = $3 /* c */"
    plan = one(sql)
    assert plan.rewritten is not None
    assert plan.rewritten.startswith(sql + "\n")
    assert returning_targets(plan.rewritten) == [IMAGE_COLUMN]


def test_image_rewrite_of_each_statement_in_a_multi_statement_text() -> None:
    plans = plan_sql("INSERT INTO a VALUES (1); DELETE FROM b WHERE at < now() RETURNING *; SELECT 1")
    assert [p.action for p in plans] == [Action.IMAGE, Action.IMAGE, Action.NONE]
    for plan in plans[:2]:
        assert plan.rewritten is not None
        assert len(parser.parse_sql(plan.rewritten)) == 1
        assert returning_targets(plan.rewritten)[-1] == IMAGE_COLUMN


# --- other writes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "MERGE: no RETURNING before PostgreSQL 17"),
        ("CALL do_things(1)", "CALL of a procedure"),
        ("DO $$ BEGIN DELETE FROM t; END $$", "DO block"),
        ("EXECUTE ins(1, 2)", "EXECUTE of an SQL-level prepared statement"),
        ("COPY t FROM '/tmp/data.csv'", "COPY from a server file"),
        ("COPY t FROM PROGRAM 'cat /tmp/x'", "COPY from a program"),
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "COPY of a write"),
        ("COPY t FROM STDIN WHERE at < now()", "COPY … WHERE calls now()"),
        ("EXPLAIN ANALYZE DELETE FROM t", "EXPLAIN ANALYZE runs the write"),
        ("EXPLAIN (ANALYZE, BUFFERS) INSERT INTO t VALUES (1)", "EXPLAIN ANALYZE runs the write"),
        ("EXPLAIN (ANALYZE true) UPDATE t SET a = 1", "EXPLAIN ANALYZE runs the write"),
    ],
)
def test_unsafe_writes(sql: str, reason: str) -> None:
    plan = one(sql)
    assert (plan.action, plan.reason) == (Action.UNSAFE, reason)


def test_merge_and_explain_name_their_target() -> None:
    assert one("MERGE INTO public.t USING s ON true WHEN MATCHED THEN DELETE").tables == ("public.t",)
    assert one("EXPLAIN ANALYZE DELETE FROM t").tables == ("t",)


def test_copy_from_stdin_replays_with_its_columns() -> None:
    plan = one('COPY public.t (a, "B", c) FROM STDIN WITH (FORMAT csv)')
    assert (plan.action, plan.copy_in, plan.tables) == (Action.REPLAY, True, ("public.t",))
    assert plan.copy_columns == ("a", "B", "c")
    plan = one("COPY t FROM STDIN")
    assert (plan.action, plan.copy_in, plan.copy_columns) == (Action.REPLAY, True, None)
    assert one("COPY t FROM STDIN WHERE a > 0").action is Action.REPLAY


@pytest.mark.parametrize("sql", ["COPY t TO STDOUT", "COPY (SELECT * FROM t) TO STDOUT", "COPY t TO '/tmp/x'"])
def test_copy_to_is_not_mirrored(sql: str) -> None:
    plan = one(sql)
    assert (plan.action, plan.copy_in) == (Action.NONE, False)


def test_truncate_replays() -> None:
    plan = one('TRUNCATE a, public."B" RESTART IDENTITY CASCADE')
    assert (plan.action, plan.tables) == (Action.REPLAY, ("a", 'public."B"'))


# --- DDL ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("CREATE TABLE t (id int PRIMARY KEY)", ("t",)),
        ("CREATE TABLE s.t AS SELECT 1 AS a", ("s.t",)),
        ("SELECT 1 AS a INTO new_table", ("new_table",)),
        ("CREATE MATERIALIZED VIEW mv AS SELECT 1", ("mv",)),
        ("REFRESH MATERIALIZED VIEW CONCURRENTLY mv", ("mv",)),
        ("ALTER TABLE t ADD COLUMN b int", ("t",)),
        ("ALTER TABLE t RENAME TO u", ("t",)),
        ("CREATE INDEX i ON t (a)", ("t",)),
        ("CREATE VIEW v AS SELECT 1", ("v",)),
        ("CREATE SEQUENCE s", ("s",)),
        ("ALTER SEQUENCE s RESTART", ("s",)),
        ('DROP TABLE a, public."B"', ("a", 'public."B"')),
        ("DROP INDEX i", ()),
        ("DROP FUNCTION f()", ()),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", ()),
        ("CREATE EXTENSION IF NOT EXISTS pgcrypto", ()),
        ("COMMENT ON TABLE t IS 'x'", ()),
        ("GRANT SELECT ON t, s.u TO app", ("t", "s.u")),
        ("REVOKE ALL ON SCHEMA s FROM app", ()),
        ("GRANT app TO bob", ()),
        ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO app", ()),
        ("SECURITY LABEL ON TABLE t IS 'secret'", ()),
        ("CREATE TYPE mood AS ENUM ('a')", ()),
        ("CREATE SCHEMA s", ()),
        ("CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()", ("t",)),
    ],
)
def test_ddl(sql: str, tables: tuple[str, ...]) -> None:
    plan = one(sql)
    assert (plan.action, plan.tables) == (Action.DDL, tables)


# --- not mirrored ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM t WHERE id = $1",
        "SELECT * FROM t FOR UPDATE",
        "SELECT now(), random(), nextval('s'), currval('s')",
        "SELECT setval('s', 42)",
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT set_config('x.y', '1', true)",
        "VALUES (1), (2)",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SET search_path = app",
        "SET LOCAL statement_timeout = 0",
        "RESET ALL",
        "SHOW search_path",
        "LOCK TABLE t IN EXCLUSIVE MODE",
        "NOTIFY ch, 'x'",
        "LISTEN ch",
        "UNLISTEN *",
        "VACUUM ANALYZE t",
        "ANALYZE t",
        "EXPLAIN DELETE FROM t",
        "EXPLAIN (ANALYZE false) DELETE FROM t",
        "EXPLAIN ANALYZE SELECT * FROM t",
        "PREPARE ins AS INSERT INTO t VALUES ($1)",
        "DEALLOCATE ins",
        "DISCARD ALL",
        "CHECKPOINT",
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t",
        "FETCH 10 FROM c",
        "MOVE NEXT IN c",
        "CLOSE c",
        "REINDEX TABLE t",
        "CLUSTER t USING i",
        "SET CONSTRAINTS ALL DEFERRED",
    ],
)
def test_not_mirrored(sql: str) -> None:
    plan = one(sql, functions_write=True)
    assert plan.action is Action.NONE, plan.reason
    assert plan.tables == ()


def test_select_calling_unknown_functions_depends_on_functions_write() -> None:
    sql = "SELECT app.bump(1), f(2), lower('x'), app.bump(3)"
    assert one(sql).action is Action.NONE
    plan = one(sql, functions_write=True)
    assert (plan.action, plan.reason) == (Action.REPLAY, "SELECT calls functions that may write: app.bump, f")
    # a function in a subquery or FROM counts as well
    assert one("SELECT * FROM t WHERE a IN (SELECT g(b) FROM u)", functions_write=True).action is Action.REPLAY
    assert one("SELECT * FROM my_srf()", functions_write=True).action is Action.REPLAY
    # a large-object write is a data write hidden in a SELECT
    assert one("SELECT lo_unlink(42)", functions_write=True).action is Action.REPLAY


def test_select_with_user_function_in_cursor_or_explain_analyze() -> None:
    assert one("DECLARE c CURSOR FOR SELECT f()").action is Action.NONE
    plan = one("DECLARE c CURSOR FOR SELECT f()", functions_write=True)
    assert plan.action is Action.UNSAFE and "f" in plan.reason
    assert one("EXPLAIN ANALYZE SELECT f()", functions_write=True).action is Action.UNSAFE
    assert one("EXPLAIN ANALYZE SELECT f()").action is Action.NONE


# --- quote_ident ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("t", "t"),
        ("t_1", "t_1"),
        ("_x", "_x"),
        ("Order", '"Order"'),
        ("order", '"order"'),
        ("user", '"user"'),
        ("int", '"int"'),  # col_name keyword: quote_ident() quotes it
        ("name", "name"),  # unreserved keyword: bare
        ("1a", '"1a"'),
        ("a b", '"a b"'),
        ("x$", '"x$"'),
        ('a"b', '"a""b"'),
        ("é", '"é"'),
    ],
)
def test_quote_ident_follows_postgres(name: str, quoted: str) -> None:
    assert quote_ident(name) == quoted


# --- Parse frames ---------------------------------------------------------------------------------------------------


def parse_frame(name: bytes, sql: bytes, oids: tuple[int, ...]) -> bytes:
    body = name + b"\x00" + sql + b"\x00" + struct.pack(f"!h{len(oids)}I", len(oids), *oids)
    return b"P" + struct.pack("!i", len(body) + 4) + body


def split_parse_frame(frame: bytes) -> tuple[bytes, bytes, tuple[int, ...]]:
    assert frame[:1] == b"P"
    (length,) = struct.unpack_from("!i", frame, 1)
    assert length == len(frame) - 1
    name_end = frame.index(b"\x00", 5)
    sql_end = frame.index(b"\x00", name_end + 1)
    (count,) = struct.unpack_from("!h", frame, sql_end + 1)
    oids = struct.unpack_from(f"!{count}I", frame, sql_end + 3)
    assert len(frame) == sql_end + 3 + 4 * count
    return frame[5:name_end], frame[name_end + 1 : sql_end], oids


@pytest.mark.parametrize(("name", "oids"), [(b"", ()), (b"stmt_1", (23, 25)), (b"s", (0, 0, 1184))])
def test_rewrite_parse_round_trip(name: bytes, oids: tuple[int, ...]) -> None:
    original = parse_frame(name, b"INSERT INTO t VALUES ($1, $2)", oids)
    plan = one("INSERT INTO t VALUES ($1, $2)")
    assert plan.rewritten is not None
    rewritten = rewrite_parse(original, plan.rewritten)
    assert split_parse_frame(rewritten) == (name, plan.rewritten.encode(), oids)
    # and back: the same frame again, byte for byte
    assert rewrite_parse(rewritten, "INSERT INTO t VALUES ($1, $2)") == original


def test_rewrite_parse_encodes_in_the_given_encoding() -> None:
    frame = parse_frame(b"", "SELECT 'é'".encode("latin-1"), ())
    rewritten = rewrite_parse(frame, "UPDATE t SET a = 'é'", encoding="latin-1")
    assert split_parse_frame(rewritten)[1] == "UPDATE t SET a = 'é'".encode("latin-1")
    assert split_parse_frame(rewrite_parse(frame, "SELECT 'é'"))[1] == "SELECT 'é'".encode()


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"P\x00\x00",
        b"Q" + struct.pack("!i", 10) + b"\x00x\x00\x00\x00",  # not a Parse
        b"P" + struct.pack("!i", 99) + b"\x00x\x00\x00\x00",  # length mismatch
        b"P" + struct.pack("!i", 7) + b"ab",  # unterminated name
        b"P" + struct.pack("!i", 9) + b"\x00abc",  # unterminated text
        b"P" + struct.pack("!i", 8) + b"\x00x\x00",  # no parameter count
        b"P" + struct.pack("!i", 10) + b"\x00x\x00\x00\x01",  # count 1, no OID
        b"P" + struct.pack("!i", 10) + b"\x00x\x00\xff\xff",  # negative count
        b"P" + struct.pack("!i", 12) + b"\x00x\x00\x00\x00\x00\x00",  # bytes after the OIDs
    ],
)
def test_rewrite_parse_rejects_malformed_frames(frame: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        rewrite_parse(frame, "SELECT 1")


def test_rewrite_parse_rejects_a_nul_in_the_new_text() -> None:
    with pytest.raises(ValueError, match="NUL"):
        rewrite_parse(parse_frame(b"", b"SELECT 1", ()), "SELECT 1\x00")


# --- PlanCache ------------------------------------------------------------------------------------------------------


def test_plan_cache_hits_and_misses() -> None:
    cache = PlanCache(4)
    first = cache.get("UPDATE t SET a = 1 WHERE id = 1")
    assert cache.get("UPDATE t SET a = 1 WHERE id = 1") is first
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    assert cache.get("UPDATE t SET b = 1 WHERE id = 2") is not first
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    assert cache.get("") == ()


@pytest.mark.parametrize(
    ("seen", "other"),
    [
        ("UPDATE t SET a = 1 WHERE id = 1", "UPDATE t SET a = 22 WHERE id = 333"),
        ("INSERT INTO t (a, b) VALUES (1, 'x')", "INSERT INTO t (a, b) VALUES (2, 'it''s')"),
        ("insert into t values (1) returning id ;", "insert into t values (12345) returning id ;"),
        ("  DELETE FROM t WHERE id = 5;  ", "  DELETE FROM t WHERE id = 6;  "),
        ("INSERT INTO t AS x (a) VALUES (1) ON CONFLICT (a) DO NOTHING", "INSERT INTO t AS x (a) VALUES (7) "
         "ON CONFLICT (a) DO NOTHING"),
        ("SELECT 1", "SELECT 2"),
    ],
)  # fmt: skip
def test_texts_differing_only_in_literals_share_a_plan_shape(seen: str, other: str) -> None:
    """pgbench -M simple: every text is new. The second text's plan is derived, not parsed, and is
    exactly what planning it would give."""
    cache = PlanCache()
    cache.get(seen)
    assert cache.get(other) == plan_sql(other)
    assert (cache.misses, cache.shared) == (1, 1)


@pytest.mark.parametrize(
    ("seen", "other"),
    [
        ("UPDATE t SET at = '2020-01-01' WHERE id = 1", "UPDATE t SET at = 'now' WHERE id = 1"),  # a time literal
        ("UPDATE t SET a = 1; UPDATE t SET b = 2", "UPDATE t SET a = 3; UPDATE t SET b = 4"),  # several statements
        ("UPDATE t SET a = 1 -- c", "UPDATE t SET a = 2 -- c"),  # comments: no literal-free key
    ],
)
def test_texts_that_must_be_planned_themselves(seen: str, other: str) -> None:
    cache = PlanCache()
    cache.get(seen)
    assert cache.get(other) == plan_sql(other)
    assert cache.shared == 0


def test_plan_cache_evicts_least_recently_used() -> None:
    cache = PlanCache(2)
    cache.get("SELECT a")
    cache.get("SELECT b")
    cache.get("SELECT a")  # now the most recent
    cache.get("SELECT c")
    assert "SELECT a" in cache and "SELECT c" in cache and "SELECT b" not in cache
    assert len(cache) == 2


def test_plan_cache_length_bounds() -> None:
    cache = PlanCache(100, max_text_length=20, max_total_length=30)
    long_text = "SELECT " + "a" * 30
    assert cache.get(long_text)[0].action is Action.NONE
    assert long_text not in cache and len(cache) == 0  # planned, never stored
    cache.get("SELECT aaaaaaaa")  # 15 characters
    cache.get("SELECT bbbbbbbb")
    assert len(cache) == 2
    cache.get("SELECT cccccccc")  # 45 > 30: the oldest goes
    assert "SELECT aaaaaaaa" not in cache and len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    cache.get("SELECT aaaaaaaa")
    assert len(cache) == 1
    assert cache.misses == 5


def test_plan_cache_fixes_functions_write() -> None:
    assert PlanCache().get("SELECT f()")[0].action is Action.NONE
    assert PlanCache(functions_write=True).get("SELECT f()")[0].action is Action.REPLAY


def test_plan_cache_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        PlanCache(0)
    with pytest.raises(ValueError):
        PlanCache(1, max_total_length=-1)
