"""The statement table for tests/unit/test_analysis.py: real SQL with the analysis routing relies on."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from proxy.sql import Kind, Pin, TxOp

# Boolean fields of Analysis: a case lists those it expects True; every other one must be False.
BOOL_FIELDS = ("volatile", "locking", "writable_cte", "select_into", "read_only_tx", "session_setting", "backend_local")


@dataclass(frozen=True)
class Case:
    sql: str
    kind: Kind
    is_read: bool
    read: frozenset[str] | None  # None: not checked
    written: frozenset[str] | None
    pins: frozenset[Pin]
    tx_op: TxOp | None
    hint: str | None
    flags: frozenset[str]
    unknown: frozenset[str] | None
    count: int


def case(
    sql: str,
    kind: Kind,
    is_read: bool,
    *,
    read: Iterable[str] | None = None,
    written: Iterable[str] | None = None,
    pins: Iterable[Pin] = (),
    tx: TxOp | None = None,
    hint: str | None = None,
    flags: str = "",
    unknown: Iterable[str] | None = None,
    count: int = 1,
) -> Case:
    return Case(
        sql=sql,
        kind=kind,
        is_read=is_read,
        read=None if read is None else frozenset(read),
        written=None if written is None else frozenset(written),
        pins=frozenset(pins),
        tx_op=tx,
        hint=hint,
        flags=frozenset(flags.split()),
        unknown=None if unknown is None else frozenset(unknown),
        count=count,
    )


R, W, D, T, S = Kind.READ, Kind.WRITE, Kind.DDL, Kind.TRANSACTION, Kind.SESSION
CI, CO, U, X = Kind.COPY_IN, Kind.COPY_OUT, Kind.UTILITY, Kind.UNKNOWN

PGBENCH = [
    # pgbench's built-in TPC-B-like script (simple and -M prepared forms) and its initialisation.
    case("BEGIN;", T, False, tx=TxOp.BEGIN),
    case("UPDATE pgbench_accounts SET abalance = abalance + -4120 WHERE aid = 61728;", W, False,
         read=(), written={"pgbench_accounts"}),
    case("SELECT abalance FROM pgbench_accounts WHERE aid = 61728;", R, True, read={"pgbench_accounts"}, written=()),
    case("SELECT abalance FROM pgbench_accounts WHERE aid = $1", R, True, read={"pgbench_accounts"}),
    case("UPDATE pgbench_tellers SET tbalance = tbalance + -4120 WHERE tid = 7;", W, False,
         written={"pgbench_tellers"}),
    case("UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2", W, False, written={"pgbench_branches"}),
    case("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 61728, -4120, CURRENT_TIMESTAMP);",
         W, False, written={"pgbench_history"}),
    case("END;", T, False, tx=TxOp.COMMIT),
    case("drop table if exists pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers", D, False,
         written={"pgbench_accounts", "pgbench_branches", "pgbench_history", "pgbench_tellers"}),
    case("create table pgbench_history(tid int,bid int,aid    int,delta int,mtime timestamp,filler char(22))", D, False,
         written={"pgbench_history"}),
    case("truncate table pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers", W, False,
         written={"pgbench_accounts", "pgbench_branches", "pgbench_history", "pgbench_tellers"}),
    case("copy pgbench_accounts from stdin with (freeze on)", CI, False, written={"pgbench_accounts"}),
    case("vacuum analyze pgbench_branches", U, False),
    case("alter table pgbench_branches add primary key (bid)", D, False, written={"pgbench_branches"}),
    case("select count(*) from pgbench_branches", R, True, read={"pgbench_branches"}),
    case("select o.n, p.partstrat, pg_catalog.count(i.inhparent) from pg_catalog.pg_class as c "
         "join pg_catalog.pg_namespace as n on (n.oid = c.relnamespace) "
         "cross join lateral (select pg_catalog.array_position(pg_catalog.current_schemas(true), n.nspname)) as o(n) "
         "left join pg_catalog.pg_partitioned_table as p on (p.partrelid = c.oid) "
         "left join pg_catalog.pg_inherits as i on (c.oid = i.inhparent) "
         "where c.relname = 'pgbench_accounts' and o.n is not null group by 1, 2 order by 1 asc limit 1", R, True,
         read={"pg_catalog.pg_class", "pg_catalog.pg_namespace", "pg_catalog.pg_partitioned_table",
               "pg_catalog.pg_inherits"}, unknown=()),
]  # fmt: skip

DJANGO = [
    case('SELECT "auth_user"."id", "auth_user"."password", "auth_user"."last_login", "auth_user"."is_superuser", '
         '"auth_user"."username", "auth_user"."email", "auth_user"."is_active", "auth_user"."date_joined" '
         'FROM "auth_user" WHERE "auth_user"."id" = 1 LIMIT 21', R, True, read={"auth_user"}),
    case('SELECT 1 AS "a" FROM "django_session" WHERE "django_session"."session_key" = \'k3y\' LIMIT 1', R, True,
         read={"django_session"}),
    case('SELECT COUNT(*) AS "__count" FROM "polls_question"', R, True, read={"polls_question"}),
    case('INSERT INTO "polls_question" ("question_text", "pub_date") VALUES (\'What\'\'s new?\', '
         '\'2024-01-01T00:00:00+00:00\'::timestamptz) RETURNING "polls_question"."id"', W, False,
         written={"polls_question"}),
    case('INSERT INTO "polls_choice" ("question_id", "choice_text", "votes") VALUES (1, \'a\', 0), (1, \'b\', 0) '
         'RETURNING "polls_choice"."id"', W, False, written={"polls_choice"}),
    case('UPDATE "django_session" SET "session_data" = \'e30\', "expire_date" = \'2024-01-15\'::timestamptz '
         'WHERE "django_session"."session_key" = \'k3y\'', W, False, written={"django_session"}),
    case('DELETE FROM "django_session" WHERE "django_session"."expire_date" < \'2024-01-01\'::timestamptz', W, False,
         written={"django_session"}),
    case('SAVEPOINT "s140213722335040_x1"', T, False, tx=TxOp.SAVEPOINT),
    case('RELEASE SAVEPOINT "s140213722335040_x1"', T, False, tx=TxOp.RELEASE),
    case('ROLLBACK TO SAVEPOINT "s140213722335040_x1"', T, False, tx=TxOp.ROLLBACK_TO),
    case("SET TIME ZONE 'UTC'", S, False, flags="session_setting"),
    # Django's ensure_timezone (psycopg 3) when the server's zone differs: a session-level set_config pins.
    case("SELECT set_config('TimeZone', 'UTC', false)", R, False, pins={Pin.SET_CONFIG}, flags="volatile"),
    case('SELECT "polls_choice"."id", "polls_choice"."question_id" FROM "polls_choice" INNER JOIN "polls_question" '
         'ON ("polls_choice"."question_id" = "polls_question"."id") WHERE "polls_question"."pub_date" <= '
         '\'2024-01-01\'::timestamptz ORDER BY "polls_choice"."id" ASC', R, True,
         read={"polls_choice", "polls_question"}),
    case('SELECT "app_account"."id", "app_account"."balance" FROM "app_account" WHERE "app_account"."id" = 1 '
         'FOR UPDATE', R, False, read={"app_account"}, flags="locking"),
    case('SELECT "app_job"."id" FROM "app_job" WHERE "app_job"."state" = \'new\' LIMIT 1 '
         'FOR UPDATE OF "app_job" SKIP LOCKED', R, False, read={"app_job"}, flags="locking"),
    case('SELECT "a"."id" FROM "app_a" "a" WHERE "a"."id" IN (SELECT U0."a_id" FROM "app_b" U0 WHERE U0."x" = 1)',
         R, True, read={"app_a", "app_b"}),
    case('SELECT DISTINCT "app_tag"."name" FROM "app_tag" ORDER BY "app_tag"."name" ASC', R, True, read={"app_tag"}),
    case('CREATE TABLE "django_migrations" ("id" bigint NOT NULL PRIMARY KEY GENERATED BY DEFAULT AS IDENTITY, '
         '"app" varchar(255) NOT NULL, "name" varchar(255) NOT NULL, "applied" timestamp with time zone NOT NULL)',
         D, False, written={"django_migrations"}),
    case('ALTER TABLE "polls_choice" ADD CONSTRAINT "polls_choice_question_id_fk" FOREIGN KEY ("question_id") '
         'REFERENCES "polls_question" ("id") DEFERRABLE INITIALLY DEFERRED', D, False),
    case('CREATE INDEX "polls_choice_question_id_c5b4b260" ON "polls_choice" ("question_id")', D, False,
         written={"polls_choice"}),
    case('SET CONSTRAINTS "polls_choice_question_id_fk" IMMEDIATE; '
         'SET CONSTRAINTS "polls_choice_question_id_fk" DEFERRED', S, False, count=2),
    case("SELECT c.relname, CASE WHEN c.relispartition THEN 'p' WHEN c.relkind IN ('m', 'v') THEN 'v' ELSE 't' END "
         "FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
         "WHERE c.relkind IN ('f', 'm', 'p', 'r', 'v') AND n.nspname NOT IN ('pg_catalog', 'pg_toast') "
         "AND pg_catalog.pg_table_is_visible(c.oid)", R, True,
         read={"pg_catalog.pg_class", "pg_catalog.pg_namespace"}),
    case('UPDATE "app_counter" SET "n" = ("app_counter"."n" + 1) WHERE "app_counter"."id" = 3', W, False),
    case('DELETE FROM "app_item" WHERE "app_item"."id" IN (1, 2, 3)', W, False, written={"app_item"}),
]  # fmt: skip

SQLALCHEMY = [
    case("select pg_catalog.version()", R, False, flags="backend_local"),
    case("select current_schema()", R, True),
    case("show standard_conforming_strings", R, True),
    case("SHOW transaction isolation level", R, True),
    case("SELECT users.id AS users_id, users.name AS users_name FROM users WHERE users.id = $1::INTEGER", R, True,
         read={"users"}),
    case("INSERT INTO users (name, fullname) VALUES ($1::VARCHAR, $2::VARCHAR) RETURNING users.id", W, False,
         written={"users"}),
    case("UPDATE users SET name=$1::VARCHAR WHERE users.id = $2::INTEGER", W, False, written={"users"}),
    case("DELETE FROM users WHERE users.id = $1::INTEGER", W, False, written={"users"}),
    case("SELECT count(*) AS count_1 FROM (SELECT users.id AS users_id FROM users WHERE users.name = $1::VARCHAR) "
         "AS anon_1", R, True, read={"users"}),
    case("SELECT pg_catalog.pg_class.relname FROM pg_catalog.pg_class JOIN pg_catalog.pg_namespace ON "
         "pg_catalog.pg_namespace.oid = pg_catalog.pg_class.relnamespace WHERE pg_catalog.pg_class.relname = "
         "$1::VARCHAR AND pg_catalog.pg_class.relkind = ANY (ARRAY[$2::VARCHAR, $3::VARCHAR]) AND "
         "pg_catalog.pg_table_is_visible(pg_catalog.pg_class.oid) AND pg_catalog.pg_namespace.nspname != $4::VARCHAR",
         R, True, read={"pg_catalog.pg_class", "pg_catalog.pg_namespace"}),
    case("SAVEPOINT sa_savepoint_1", T, False, tx=TxOp.SAVEPOINT),
    case("RELEASE SAVEPOINT sa_savepoint_1", T, False, tx=TxOp.RELEASE),
    case("ROLLBACK TO SAVEPOINT sa_savepoint_1", T, False, tx=TxOp.ROLLBACK_TO),
    case("SELECT addresses.id, addresses.email FROM addresses WHERE $1::INTEGER = addresses.user_id "
         "ORDER BY addresses.id", R, True, read={"addresses"}),
    case("INSERT INTO users (name) SELECT name FROM staging_users WHERE staging_users.ok", W, False,
         read={"staging_users"}, written={"users"}),
]  # fmt: skip

RAILS = [
    case('SELECT "users".* FROM "users" WHERE "users"."id" = $1 LIMIT $2', R, True, read={"users"}),
    case('INSERT INTO "users" ("name", "created_at", "updated_at") VALUES ($1, $2, $3) RETURNING "id"', W, False,
         written={"users"}),
    case('UPDATE "users" SET "name" = $1, "updated_at" = $2 WHERE "users"."id" = $3', W, False, written={"users"}),
    case('SELECT 1 AS one FROM "users" WHERE "users"."email" = $1 LIMIT $2', R, True, read={"users"}),
    case('SELECT COUNT(*) FROM "posts" WHERE "posts"."user_id" = $1', R, True, read={"posts"}),
    case('SELECT "schema_migrations"."version" FROM "schema_migrations" ORDER BY "schema_migrations"."version" ASC',
         R, True, read={"schema_migrations"}),
    case('SELECT "ar_internal_metadata"."value" FROM "ar_internal_metadata" '
         'WHERE "ar_internal_metadata"."key" = $1 LIMIT $2', R, True),
    case("SET client_min_messages TO 'warning'", S, False, flags="session_setting"),
    case("SET standard_conforming_strings = on", S, False, flags="session_setting"),
    case("SET intervalstyle = iso_8601", S, False, flags="session_setting"),
    case("SET SESSION timezone TO 'UTC'", S, False, flags="session_setting"),
    case("SELECT pg_try_advisory_lock(3040405922157163880)", R, False, pins={Pin.ADVISORY_LOCK}, flags="volatile"),
    case("SELECT pg_advisory_unlock(3040405922157163880)", R, False, flags="volatile"),
    case("SAVEPOINT active_record_1", T, False, tx=TxOp.SAVEPOINT),
    case("RELEASE SAVEPOINT active_record_1", T, False, tx=TxOp.RELEASE),
    case("SELECT a.attname, format_type(a.atttypid, a.atttypmod), pg_get_expr(d.adbin, d.adrelid), a.attnotnull, "
         "a.atttypid, a.atttypmod, c.collname, col_description(a.attrelid, a.attnum) AS comment "
         "FROM pg_attribute a LEFT JOIN pg_attrdef d ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
         "LEFT JOIN pg_type t ON a.atttypid = t.oid LEFT JOIN pg_collation c ON a.attcollation = c.oid "
         "AND a.attcollation <> t.typcollation WHERE a.attrelid = '\"users\"'::regclass AND a.attnum > 0 "
         "AND NOT a.attisdropped ORDER BY a.attnum", R, True,
         read={"pg_attribute", "pg_attrdef", "pg_type", "pg_collation"}, unknown=()),
    case("SELECT t.oid, t.typname FROM pg_type as t WHERE t.typname IN ('int2', 'int4', 'int8', 'oid')", R, True),
    case('SELECT "posts".* FROM "posts" INNER JOIN "comments" ON "comments"."post_id" = "posts"."id" '
         'WHERE "comments"."user_id" = $1 ORDER BY "posts"."created_at" DESC LIMIT $2 OFFSET $3', R, True,
         read={"posts", "comments"}),
    case('DELETE FROM "sessions" WHERE "sessions"."updated_at" < $1', W, False, written={"sessions"}),
    case('SELECT "users".* FROM "users" WHERE "users"."id" = $1 LIMIT $2 FOR UPDATE', R, False, flags="locking"),
]  # fmt: skip

HIBERNATE = [
    case("select u1_0.id,u1_0.email,u1_0.name from users u1_0 where u1_0.id=$1", R, True, read={"users"}),
    case("select nextval('users_seq')", R, False, flags="volatile", unknown=()),
    case("insert into users (email,name,id) values ($1,$2,$3)", W, False, written={"users"}),
    case("update users set email=$1,name=$2,version=$3 where id=$4 and version=$5", W, False, written={"users"}),
    case("select u1_0.id from users u1_0 where u1_0.id=$1 for no key update", R, False, flags="locking"),
    case("select u1_0.id from users u1_0 where u1_0.id=$1 for share", R, False, flags="locking"),
    case("select u1_0.id from users u1_0 where u1_0.id=$1 for key share nowait", R, False, flags="locking"),
    case("delete from users where id=$1 and version=$2", W, False, written={"users"}),
    case("SET extra_float_digits = 3", S, False, flags="session_setting"),
    case("SET application_name = 'PostgreSQL JDBC Driver'", S, False, flags="session_setting"),
    case("select o1_0.id,o1_0.total from orders o1_0 join customers c1_0 on c1_0.id=o1_0.customer_id "
         "where c1_0.email=$1 order by o1_0.id offset $2 rows fetch first $3 rows only", R, True,
         read={"orders", "customers"}),
]  # fmt: skip

POSTGRES_DOCS = [
    case("INSERT INTO films VALUES ('UA502', 'Bananas', 105, '1971-07-13', 'Comedy', '82 minutes');", W, False,
         written={"films"}),
    case("INSERT INTO films SELECT * FROM tmp_films WHERE date_prod < '2004-05-07';", W, False,
         read={"tmp_films"}, written={"films"}),
    case("INSERT INTO distributors (did, dname) VALUES (5, 'Gizmo Transglobal'), (6, 'Associated Computing, Inc') "
         "ON CONFLICT (did) DO UPDATE SET dname = EXCLUDED.dname;", W, False, written={"distributors"}),
    case("UPDATE employees SET sales_count = sales_count + 1 FROM accounts WHERE accounts.name = 'Acme Corporation' "
         "AND employees.id = accounts.sales_person;", W, False, read={"accounts"}, written={"employees"}),
    case("DELETE FROM films USING producers WHERE producer_id = producers.id AND producers.name = 'foo';", W, False,
         read={"producers"}, written={"films"}),
    case("MERGE INTO customer_account ca USING recent_transactions t ON t.customer_id = ca.customer_id "
         "WHEN MATCHED THEN UPDATE SET balance = balance + transaction_value "
         "WHEN NOT MATCHED THEN INSERT (customer_id, balance) VALUES (t.customer_id, t.transaction_value);", W, False,
         read={"recent_transactions"}, written={"customer_account"}),
    case("WITH moved_rows AS (DELETE FROM products WHERE \"date\" >= '2010-10-01' AND \"date\" < '2010-11-01' "
         "RETURNING *) INSERT INTO products_log SELECT * FROM moved_rows;", W, False, read=(),
         written={"products", "products_log"}, flags="writable_cte"),
    case("WITH RECURSIVE t(n) AS (VALUES (1) UNION ALL SELECT n+1 FROM t WHERE n < 100) SELECT sum(n) FROM t;", R,
         True, read=()),
    case("WITH regional_sales AS (SELECT region, SUM(amount) AS total_sales FROM orders GROUP BY region), "
         "top_regions AS (SELECT region FROM regional_sales WHERE total_sales > "
         "(SELECT SUM(total_sales)/10 FROM regional_sales)) SELECT region, product, SUM(quantity) AS product_units, "
         "SUM(amount) AS product_sales FROM orders WHERE region IN (SELECT region FROM top_regions) "
         "GROUP BY region, product;", R, True, read={"orders"}),
    case("SELECT * FROM weather WHERE city = 'San Francisco' AND prcp > 0.0;", R, True, read={"weather"}),
    case("SELECT city, max(temp_lo) FROM weather GROUP BY city HAVING max(temp_lo) < 40;", R, True),
    case("SELECT * FROM weather LEFT OUTER JOIN cities ON weather.city = cities.name;", R, True,
         read={"weather", "cities"}),
    case("SELECT depname, empno, salary, rank() OVER (PARTITION BY depname ORDER BY salary DESC) FROM empsalary;", R,
         True, read={"empsalary"}),
    case("VALUES (1, 'one'), (2, 'two'), (3, 'three');", R, True, read=()),
    case("TABLE films;", R, True, read={"films"}),
    case("SELECT * FROM generate_series(1, 10) AS s(i);", R, True, read=(), unknown=()),
    case("SELECT f.title, f.did, d.name FROM distributors d JOIN films f USING (did);", R, True,
         read={"distributors", "films"}),
    case("SELECT m.name AS mname, pname FROM manufacturers m LEFT JOIN LATERAL get_product_names(m.id) pname ON true;",
         R, False, read={"manufacturers"}, unknown={"get_product_names"}),
    case("SELECT * FROM films TABLESAMPLE SYSTEM (10) REPEATABLE (42)", R, True),
    case("LOCK TABLE films IN SHARE ROW EXCLUSIVE MODE;", W, False, written={"films"}),
    case("TRUNCATE bigtable, fattable RESTART IDENTITY;", W, False, written={"bigtable", "fattable"}),
    case("COPY country TO STDOUT (DELIMITER '|');", CO, False, read={"country"}, written=()),
    case("COPY country FROM STDIN (FORMAT csv, HEADER true)", CI, False, written={"country"}),
    case("COPY country FROM '/usr1/proj/bray/sql/country_data';", W, False, written={"country"}),
    case("COPY (SELECT * FROM country WHERE country_name LIKE 'A%') TO '/usr1/proj/bray/sql/a_list_countries.copy';",
         U, False, read={"country"}),
    case("CALL insert_data(1, 2);", W, False, unknown={"insert_data"}),
    case("DO $$DECLARE r record; BEGIN FOR r IN SELECT table_schema, table_name FROM information_schema.tables "
         "WHERE table_type = 'VIEW' AND table_schema = 'public' LOOP EXECUTE 'GRANT ALL ON ' || "
         "quote_ident(r.table_schema) || '.' || quote_ident(r.table_name) || ' TO webuser'; END LOOP; END$$;", W, False,
         read={"information_schema.tables"}, pins={Pin.UNKNOWN_SESSION_STATE}),
    case("EXPLAIN SELECT * FROM foo;", R, True, read={"foo"}),
    case("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM foo WHERE i = 4;", R, True, read={"foo"}),
    case("EXPLAIN ANALYZE DELETE FROM foo WHERE i < 10", W, False, written={"foo"}),
    case("EXPLAIN (ANALYZE false, COSTS off) DELETE FROM foo", R, True, read={"foo"}, written=()),
    case("EXPLAIN (ANALYZE on) UPDATE foo SET i = 1", W, False, written={"foo"}),
    case("EXPLAIN ANALYZE CREATE TABLE foo2 AS SELECT * FROM foo", D, False, read={"foo"}, written={"foo2"}),
    case("VACUUM (VERBOSE, ANALYZE) onek;", U, False),
    case("ANALYZE users;", U, False),
    case("CHECKPOINT;", U, False),
    case("REINDEX TABLE my_table;", U, False),
    case("CLUSTER employees USING employees_ind;", U, False),
    case("ALTER SYSTEM SET work_mem = '64MB'", U, False),
    case("CREATE TABLE films (code char(5) CONSTRAINT firstkey PRIMARY KEY, title varchar(40) NOT NULL, "
         "did integer NOT NULL, date_prod date, kind varchar(10), len interval hour to minute);", D, False,
         written={"films"}),
    case("CREATE TABLE orders (id bigint PRIMARY KEY DEFAULT nextval('orders_id_seq'), "
         "placed timestamptz DEFAULT now())", D, False, written={"orders"}),
    case("CREATE TABLE new_films AS SELECT * FROM films WHERE date_prod >= '2002-01-01'", D, False, read={"films"},
         written={"new_films"}),
    case("CREATE MATERIALIZED VIEW mv AS SELECT count(*) FROM t", D, False, read={"t"}, written={"mv"}),
    case("REFRESH MATERIALIZED VIEW CONCURRENTLY mv", W, False, written={"mv"}),
    case("CREATE INDEX CONCURRENTLY idx_t_a ON t (a)", D, False, written={"t"}),
    case("CREATE VIEW comedies AS SELECT * FROM films WHERE kind = 'Comedy';", D, False, read={"films"},
         written={"comedies"}),
    case("CREATE SEQUENCE serial START 101;", D, False),
    case("ALTER SEQUENCE serial RESTART WITH 105;", D, False),
    case("DROP TABLE films, distributors;", D, False, written={"films", "distributors"}),
    case("DROP INDEX idx_t_a", D, False, written=()),
    case("GRANT SELECT ON mytable TO PUBLIC;", D, False),
    case("REVOKE ALL ON accounts FROM PUBLIC;", D, False),
    case("GRANT admins TO joe;", D, False),
    case("COMMENT ON TABLE mytable IS 'This is my table.';", D, False),
    case("CREATE FUNCTION add(integer, integer) RETURNS integer AS 'select $1 + $2;' LANGUAGE SQL IMMUTABLE "
         "RETURNS NULL ON NULL INPUT;", D, False),
    case("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT pg_advisory_lock(1); SELECT 1; END", D,
         False),
    case("CREATE EXTENSION IF NOT EXISTS pgcrypto", D, False),
    case("CREATE SCHEMA myschema", D, False),
    case("ALTER TABLE distributors ADD COLUMN address varchar(30);", D, False, written={"distributors"}),
    case("ALTER TABLE distributors RENAME TO suppliers", D, False),
    case("CREATE ROLE admin WITH LOGIN", D, False),
    case("CREATE TRIGGER check_update BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION check_account_update();",
         D, False),
    case("CREATE RULE notify_me AS ON UPDATE TO mytable DO ALSO NOTIFY mytable;", D, False),
    case("CREATE DATABASE lusiadas;", D, False),
    case("CREATE PUBLICATION mypublication FOR TABLE users, departments;", D, False),
    case("CREATE POLICY account_managers ON accounts TO managers USING (manager = current_user);", D, False),
    case("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');", D, False),
    case("ALTER DEFAULT PRIVILEGES IN SCHEMA myschema GRANT SELECT ON TABLES TO PUBLIC;", D, False),
]  # fmt: skip

TRANSACTIONS = [
    case("BEGIN", T, False, tx=TxOp.BEGIN),
    case("START TRANSACTION", T, False, tx=TxOp.BEGIN),
    case("BEGIN READ ONLY", T, False, tx=TxOp.BEGIN, flags="read_only_tx"),
    case("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", T, False, tx=TxOp.BEGIN, flags="read_only_tx"),
    case("BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", T, False, tx=TxOp.BEGIN,
         flags="read_only_tx"),
    case("BEGIN ISOLATION LEVEL REPEATABLE READ", T, False, tx=TxOp.BEGIN),
    case("START TRANSACTION READ WRITE", T, False, tx=TxOp.BEGIN),
    case("COMMIT", T, False, tx=TxOp.COMMIT),
    case("COMMIT AND CHAIN", T, False, tx=TxOp.COMMIT),
    case("ROLLBACK", T, False, tx=TxOp.ROLLBACK),
    case("ABORT", T, False, tx=TxOp.ROLLBACK),
    case("SAVEPOINT my_savepoint;", T, False, tx=TxOp.SAVEPOINT),
    case("RELEASE my_savepoint", T, False, tx=TxOp.RELEASE),
    case("ROLLBACK TO SAVEPOINT x", T, False, tx=TxOp.ROLLBACK_TO),
    case("ROLLBACK TO my_savepoint", T, False, tx=TxOp.ROLLBACK_TO),
    case("PREPARE TRANSACTION 'foobar';", T, False, tx=TxOp.PREPARE),
    case("COMMIT PREPARED 'foobar';", T, False, tx=TxOp.COMMIT_PREPARED),
    case("ROLLBACK PREPARED 'foobar';", T, False, tx=TxOp.ROLLBACK_PREPARED),
    case("BEGIN; UPDATE accounts SET balance = balance - 100.00 WHERE name = 'Alice'; COMMIT;", W, False,
         tx=TxOp.BEGIN, written={"accounts"}, count=3),
    case("BEGIN READ ONLY; SELECT * FROM t; COMMIT", T, False, tx=TxOp.BEGIN, flags="read_only_tx", count=3),
    case("SELECT 1; COMMIT; BEGIN", T, False, tx=TxOp.COMMIT, count=3),
]  # fmt: skip

SESSION = [
    case("SET search_path TO my_schema, public;", S, False, flags="session_setting"),
    case("SET LOCAL statement_timeout = '5s'", S, False),
    case("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", S, False),
    case("SET TRANSACTION READ ONLY", S, False),
    case("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ", S, False,
         flags="session_setting"),
    case("RESET search_path", S, False, flags="session_setting"),
    case("RESET ALL", S, False, flags="session_setting"),
    case("SET ROLE paul;", S, False, flags="session_setting"),
    case("RESET ROLE", S, False, flags="session_setting"),
    case("SET SESSION AUTHORIZATION 'paul'", S, False, flags="session_setting"),
    case("DISCARD ALL", S, False, pins={Pin.UNKNOWN_SESSION_STATE}),
    case("DISCARD PLANS", S, False, pins={Pin.UNKNOWN_SESSION_STATE}),
    case("DISCARD TEMP", S, False, pins={Pin.UNKNOWN_SESSION_STATE}),
    case("SHOW search_path", R, True),
    case("SHOW TIME ZONE", R, True),
    case("SHOW ALL", R, False, flags="backend_local"),
    case("SHOW server_version", R, False, flags="backend_local"),
    case("LISTEN virtual;", S, False, pins={Pin.LISTEN}),
    case("UNLISTEN *", S, False),
    case("NOTIFY virtual, 'payload'", W, False),
    case("SELECT pg_notify('jobs', '42')", R, False, flags="volatile"),
    case("LOAD 'auto_explain'", S, False, pins={Pin.UNKNOWN_SESSION_STATE}),
    case("PREPARE fooplan (int, text, bool, numeric) AS INSERT INTO foo VALUES($1, $2, $3, $4);", S, False,
         pins={Pin.PREPARE}, written=()),
    case("PREPARE q AS SELECT nextval('s')", S, False, pins={Pin.PREPARE}),
    case("EXECUTE fooplan(1, 'Hunter Valley', 't', 200.00);", X, False),
    case("EXPLAIN EXECUTE fooplan(1, 'x', 't', 1)", X, False),
    case("DEALLOCATE fooplan", S, False),
    case("DEALLOCATE ALL", S, False),
    case("DECLARE liahona CURSOR FOR SELECT * FROM films;", R, True, read={"films"}),
    case("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM films", R, False, pins={Pin.CURSOR_WITH_HOLD}),
    case("DECLARE c NO SCROLL CURSOR WITHOUT HOLD FOR SELECT * FROM films FOR UPDATE", R, False, flags="locking"),
    case("FETCH FORWARD 5 FROM liahona;", X, False),
    case("MOVE 5 IN liahona", X, False),
    case("CLOSE liahona;", S, False),
    case("CLOSE ALL", S, False),
    case("CREATE TEMP TABLE x (a int)", D, False, pins={Pin.TEMP_TABLE}, written={"x"}),
    case("CREATE TEMPORARY TABLE tmp_ids (id bigint) ON COMMIT DELETE ROWS", D, False, pins={Pin.TEMP_TABLE}),
    case("CREATE TEMP TABLE scratch (a int) ON COMMIT DROP", D, False),
    case("CREATE TEMP TABLE tmp_x ON COMMIT DROP AS SELECT * FROM t", D, False, read={"t"}),
    case("CREATE TEMP TABLE tmp_y AS SELECT * FROM t", D, False, pins={Pin.TEMP_TABLE}, read={"t"},
         written={"tmp_y"}),
    case("CREATE TABLE pg_temp.scratch (a int)", D, False, pins={Pin.TEMP_TABLE}),
    case("CREATE TEMP VIEW v AS SELECT * FROM t", D, False, pins={Pin.TEMP_TABLE}),
    case("CREATE TEMP SEQUENCE tmp_seq", D, False, pins={Pin.TEMP_TABLE}),
    case("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'select 1'", D, False, pins={Pin.TEMP_TABLE}),
    case("SELECT * INTO TEMP tmp_t FROM t", D, False, pins={Pin.TEMP_TABLE}, read={"t"}, written={"tmp_t"},
         flags="select_into"),
    case("SELECT pg_advisory_lock(1)", R, False, pins={Pin.ADVISORY_LOCK}, flags="volatile"),
    case("SELECT pg_advisory_lock_shared(1, 2)", R, False, pins={Pin.ADVISORY_LOCK}, flags="volatile"),
    case("SELECT pg_catalog.pg_try_advisory_lock_shared(7)", R, False, pins={Pin.ADVISORY_LOCK}, flags="volatile"),
    case("SELECT pg_advisory_xact_lock(1)", R, False, flags="volatile"),
    case("SELECT pg_try_advisory_xact_lock(1)", R, False, flags="volatile"),
    case("SELECT pg_advisory_unlock_all()", R, False, flags="volatile"),
    case("SELECT set_config('a.b', 'c', false)", R, False, pins={Pin.SET_CONFIG}, flags="volatile"),
    case("SELECT set_config('a.b', 'c', true)", R, False, flags="volatile"),
    case("SELECT set_config('a.b', 'c', 'on')", R, False, flags="volatile"),
    case("SELECT set_config('a.b', 'c', $1)", R, False, pins={Pin.SET_CONFIG}, flags="volatile"),
    case("SELECT set_config('app.user_id', $1, 'false'::boolean)", R, False, pins={Pin.SET_CONFIG}, flags="volatile"),
    case("DO $$ BEGIN UPDATE t SET x = 1; END $$", W, False, written={"t"}),
    case("DO LANGUAGE plpgsql $$ BEGIN PERFORM pg_advisory_lock(42); END $$", W, False, pins={Pin.ADVISORY_LOCK},
         flags="volatile"),
    case("DO $$ BEGIN SET search_path = app; END $$", W, False, pins={Pin.UNKNOWN_SESSION_STATE}),
    case("DO $$ BEGIN SET LOCAL search_path = app; END $$", W, False),
    case("DO $$ BEGIN CREATE TEMP TABLE scratch (id int); END $$", W, False, pins={Pin.TEMP_TABLE}),
    case("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app') THEN CREATE ROLE app; END IF; "
         "END $$", W, False, read={"pg_roles"}),
    case("DO $body$ BEGIN LISTEN jobs; END $body$", W, False, pins={Pin.LISTEN}),
    case("DO LANGUAGE plpython3u $$ plpy.execute('LISTEN x') $$", W, False),
    case("DO $$ BEGIN this is not plpgsql; END $$", W, False),
]  # fmt: skip

TRICKY = [
    case("SELECT nextval('s')", R, False, flags="volatile"),
    case("SELECT setval('s', 42)", R, False, flags="volatile"),
    case("SELECT currval('users_id_seq')", R, False, flags="volatile"),
    case("SELECT lastval()", R, False, flags="volatile"),
    case("SELECT gen_random_uuid()", R, False, flags="volatile"),
    case("SELECT uuid_generate_v4()", R, False, flags="volatile"),
    case("SELECT clock_timestamp()", R, False, flags="volatile"),
    case("SELECT txid_current()", R, False, flags="volatile"),
    case("SELECT pg_sleep(1)", R, False, flags="volatile"),
    case("SELECT random()", R, False, flags="volatile"),
    case("SELECT * FROM t ORDER BY random() LIMIT 1", R, False, read={"t"}, flags="volatile"),
    case("SELECT now()", R, True, unknown=()),
    case("SELECT CURRENT_TIMESTAMP, current_user, CURRENT_DATE", R, True),
    case("SELECT pg_catalog.now()", R, True),
    case("SELECT EXTRACT(EPOCH FROM now())", R, True),
    case("SELECT jsonb_build_object('a', 1), lower('X'), coalesce(NULL, 1), greatest(1, 2)", R, True, unknown=()),
    case("SELECT my_func(1)", R, False, unknown={"my_func"}),
    case("SELECT public.lower('x')", R, False, unknown={"public.lower"}),
    case("SELECT app.calc(t.a) FROM t", R, False, read={"t"}, unknown={"app.calc"}),
    case("SELECT inet_server_port()", R, True),
    case("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", W, False, read=(), written={"t"},
         flags="writable_cte"),
    case("WITH u AS (UPDATE t SET a = 1 RETURNING id) SELECT count(*) FROM u", W, False, written={"t"},
         flags="writable_cte"),
    case("WITH i AS (INSERT INTO t (a) VALUES (1) RETURNING id) SELECT id FROM i", W, False, written={"t"},
         flags="writable_cte"),
    case("WITH m AS (MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE RETURNING t.*) SELECT * FROM m",
         W, False, read={"s"}, written={"t"}, flags="writable_cte"),
    case("WITH t AS (SELECT * FROM t) SELECT * FROM t", R, True, read={"t"}),
    case("WITH x AS (SELECT 1) SELECT * FROM x, y", R, True, read={"y"}),
    case("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", R, False, read={"t"}, flags="locking"),
    case("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR SHARE)", R, False, read={"t", "u"}, flags="locking"),
    case("SELECT * FROM t FOR UPDATE OF t SKIP LOCKED", R, False, read={"t"}, flags="locking"),
    case("SELECT * INTO new_t FROM t", D, False, read={"t"}, written={"new_t"}, flags="select_into"),
    case("SELECT 1; SELECT 2", R, True, count=2),
    case("SELECT 1; INSERT INTO t VALUES (1)", W, False, written={"t"}, count=2),
    case("SET search_path = app; SELECT * FROM users", S, False, read={"users"}, flags="session_setting", count=2),
    case("SELECT 1; COPY t TO STDOUT", CO, False, read={"t"}, count=2),
    case("CREATE TABLE a (id int); INSERT INTO a VALUES (1)", W, False, written={"a"}, count=2),
    case("SELECT 1; EXECUTE p", X, False, count=2),
    case("COPY (SELECT * FROM t WHERE a > 1) TO STDOUT WITH (FORMAT binary)", CO, False, read={"t"}),
    case("COPY (DELETE FROM t RETURNING *) TO STDOUT", W, False, written={"t"}),
    case("COPY (SELECT nextval('s')) TO STDOUT", CO, False, flags="volatile"),
    case("COPY t (a, b) FROM STDIN WHERE a > 0", CI, False, written={"t"}),
    case("COPY t TO PROGRAM 'gzip > /tmp/t.gz'", U, False, read={"t"}),
    case("EXPLAIN SELECT nextval('s')", R, True),
    case("EXPLAIN ANALYZE SELECT nextval('s')", R, False, flags="volatile"),
    case("EXPLAIN SELECT * FROM t FOR UPDATE", R, True, read={"t"}),
    case("CALL p()", W, False, unknown={"p"}),
    case("CALL app.refresh_stats($1)", W, False),
    case("INSERT INTO t (a) SELECT nextval('s') FROM u", W, False, read={"u"}, written={"t"}, flags="volatile"),
    case("UPDATE t SET a = random()", W, False, written={"t"}, flags="volatile"),
    case("INSERT INTO t DEFAULT VALUES RETURNING *", W, False, written={"t"}),
    case("SELECT * FROM public.users", R, True, read={"public.users"}),
    case('SELECT * FROM "Users"', R, True, read={"users"}),
    case("SELECT * FROM mydb.public.t", R, True, read={"mydb.public.t"}),
    case('SELECT * FROM "Public"."Orders" o JOIN public.customers c ON c.id = o.customer_id', R, True,
         read={"public.orders", "public.customers"}),
    case("SELECT a FROM t UNION ALL SELECT b FROM u EXCEPT SELECT c FROM v", R, True, read={"t", "u", "v"}),
    case("SELECT * FROM t1 JOIN LATERAL (SELECT * FROM t2 WHERE t2.id = t1.id) s ON true", R, True,
         read={"t1", "t2"}),
    case("SELECT id FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.t_id = t.id)", R, True, read={"t", "u"}),
    case("SELECT * FROM t WHERE id = ANY($1) AND name ILIKE $2", R, True, read={"t"}),
    case("SELECT * FROM json_table('[1, 2]'::jsonb, '$[*]' COLUMNS (a int PATH '$')) jt", R, True, read=()),
    case("SELECT pg_backend_pid()", R, False, flags="backend_local"),
    case("SELECT * FROM pg_stat_activity WHERE pid = 4242", R, False, read={"pg_stat_activity"},
         flags="backend_local"),
    case("SELECT * FROM pg_catalog.pg_locks", R, False, flags="backend_local"),
    case("SELECT name FROM pg_prepared_statements", R, False, flags="backend_local"),
    case("SELECT version()", R, False, flags="backend_local"),
    case("SELECT relname FROM pg_class WHERE relname = 'pg_stat_activity'", R, True, read={"pg_class"}),
    case("/* pgshift:route=new */ SELECT * FROM users", R, True, read={"users"}, hint="new"),
    case("SELECT * FROM users -- pgshift:route=old", R, True, hint="old"),
    case("SELECT * FROM users /* app=web, pgshift:route = replica_2 */", R, True, hint="replica_2"),
    case("SELECT '/* pgshift:route=new */' AS s", R, True, hint=None),
    case("/* pgshift:route=new-db */ INSERT INTO t VALUES (1)", W, False, hint="new-db"),
    case("/* pgshift:route=new */ SELEC 1", X, False, hint="new", count=0),
]  # fmt: skip

GARBAGE = [
    case("SELEC 1", X, False, count=0),
    case("this is not sql", X, False, count=0),
    case("SELECT (", X, False, count=0),
    case("SELECT 'unterminated", X, False, count=0),
    case("SELECT 1 /* unterminated comment", X, False, count=0),
    case("INSERT INTO", X, False, count=0),
    case("SELECT \x00 nextval('s')", X, False, count=0),
    case("", R, True, count=0),
    case(";", R, True, count=0),
    case("-- only a comment", R, True, count=0),
]  # fmt: skip

CASES: list[Case] = PGBENCH + DJANGO + SQLALCHEMY + RAILS + HIBERNATE + POSTGRES_DOCS + TRANSACTIONS + SESSION
CASES += TRICKY + GARBAGE
