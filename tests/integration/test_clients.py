"""Real clients through pgshift notice no difference: each behaves exactly as against the database.

Every scenario that can be compared runs twice, once directly on ``pg_cluster`` and once through
the proxy, and the observations (rows, command tags, errors with all their fields, transaction
status, notices) must be identical. Clients: psql, psycopg 3 (sync/async), asyncpg, pgbench.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import generators, pq, waiting
from psycopg.pq import TransactionStatus as TS
from psycopg.types.json import Jsonb

from proxy.localpg import LocalCluster
from tests.support.proxy import ProxyThread

pytestmark = pytest.mark.timeout(60)

# Clients must not pick up connection settings from the environment of whoever runs the tests.
CLIENT_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"PGCONNECT_TIMEOUT": "10"}


def uid(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def direct(pg_cluster: LocalCluster) -> str:
    return pg_cluster.dsn()


@pytest.fixture
def new_table(direct: str) -> Iterator[Callable[[str], str]]:
    """``new_table("(id int primary key, …)")`` creates a uniquely named table, dropped afterwards."""
    names: list[str] = []

    def make(columns: str) -> str:
        name = uid()
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute(f"create table {name} {columns}")
        names.append(name)
        return name

    yield make
    with psycopg.connect(direct, autocommit=True) as conn:
        for name in names:
            conn.execute(f"drop table if exists {name} cascade")


def run_sql(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def backend_fifo(proxy: ProxyThread, pid: int) -> tuple[bool, str]:
    """(idle, FIFO repr) of the proxy's backend connection with this backend pid.

    When a client has its answer (it saw ReadyForQuery) the FIFO of expected replies must be
    empty: a stale entry means the proxy misjudges which reply belongs to which request.
    """
    done: concurrent.futures.Future[tuple[bool, str]] = concurrent.futures.Future()

    def look() -> None:
        try:
            assert proxy.server is not None
            for session in proxy.server.registry:
                backend = session.backend
                key = backend.startup.key if backend is not None and backend.startup is not None else None
                if backend is not None and key is not None and key.pid == pid:
                    done.set_result((backend.scanner.idle, repr(backend.expected)))
                    return
            done.set_exception(LookupError(f"no proxy session with backend pid {pid}"))
        except BaseException as exc:
            done.set_exception(exc)

    proxy.call(look)
    return done.result(5)


def assert_fifo_idle(proxy: ProxyThread, pid: int) -> None:
    idle, fifo = backend_fifo(proxy, pid)
    assert idle, f"client is idle but the proxy still expects replies: {fifo}"


# =========================================================================================
# psql
# =========================================================================================


def psql(
    dsn: str, *args: str, stdin: str | None = None, stop_on_error: bool = True
) -> subprocess.CompletedProcess[str]:
    argv = ["psql", "-X", *(["-v", "ON_ERROR_STOP=1"] if stop_on_error else []), "-d", dsn, *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=CLIENT_ENV, timeout=30)


def same_psql(proxy_run: subprocess.CompletedProcess[str], direct_run: subprocess.CompletedProcess[str]) -> None:
    assert (proxy_run.returncode, proxy_run.stdout, proxy_run.stderr) == (
        direct_run.returncode,
        direct_run.stdout,
        direct_run.stderr,
    )


MULTI = (
    "select 1 as one, 'a'::text as letter; "
    "create temp table tmp_multi (id int primary key, v text); "
    "insert into tmp_multi select g, md5(g::text) from generate_series(1, 5) g; "
    "update tmp_multi set v = upper(v) where id > 3; "
    "select * from tmp_multi order by id; "
    "delete from tmp_multi where id = 1; "
    "values (1, null), (2, 'x')"
)


@pytest.mark.parametrize(
    ("command", "must_contain"),
    [
        (MULTI, ["INSERT 0 5", "UPDATE 2", "DELETE 1", "(5 rows)", "one | letter", "CREATE TABLE"]),
        ("select 1 as before; select 1/0; select 2 as after", ["before"]),
        ("", []),
    ],
    ids=["several-results", "error-midway", "empty"],
)
def test_psql_multi_statement_command(proxy: ProxyThread, direct: str, command: str, must_contain: list[str]) -> None:
    through = psql(proxy.dsn(), "-c", command)
    same_psql(through, psql(direct, "-c", command))
    for text in must_contain:
        assert text in through.stdout


def test_psql_copy_in_and_out(proxy: ProxyThread, direct: str, new_table: Callable[[str], str]) -> None:
    table = new_table("(id int primary key, name text, note text)")
    lines = []
    for i in range(1, 4001):
        note = "\\N" if i % 10 == 0 else f"tab\\there, backslash \\\\ ünïcødé {'€' * (i % 4)}"
        lines.append(f"{i}\tname {i}\t{note}\n")
    data = "".join(lines)

    loaded = psql(proxy.dsn(), "-c", f"\\copy {table} from stdin", stdin=data)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "COPY 4000"

    out_cmd = f"\\copy (select * from {table} order by id) to stdout"
    through = psql(proxy.dsn(), "-c", out_cmd)
    same_psql(through, psql(direct, "-c", out_cmd))
    assert through.stdout == data

    # A bad line in the middle: same error (line number, column) and nothing loaded.
    bad = "".join(f"{i + 5000}\tx\ty\n" for i in range(3000)) + "oops\tx\ty\n"
    through = psql(proxy.dsn(), "-c", f"\\copy {table} from stdin", stdin=bad)
    same_psql(through, psql(direct, "-c", f"\\copy {table} from stdin", stdin=bad))
    assert through.returncode != 0 and 'invalid input syntax for type integer: "oops"' in through.stderr
    assert run_sql(direct, f"select count(*) from {table}") == [(4000,)]


@pytest.mark.timeout(20)
def test_psql_watch(proxy: ProxyThread) -> None:
    proc = subprocess.Popen(
        ["psql", "-X", "-d", proxy.dsn()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLIENT_ENV,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write("select 'tick' as t \\watch 0.2\n")
        proc.stdin.flush()
        time.sleep(1.5)
        proc.terminate()  # psql flushes its output after every \watch iteration
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out.count("(every 0.2s)") >= 4, (out, err)
    assert out.count("tick") >= 4
    assert "error" not in err.lower()


def test_psql_verbose_errors(proxy: ProxyThread, direct: str, new_table: Callable[[str], str]) -> None:
    table = new_table("(id int primary key, qty int constraint qty_positive check (qty > 0))")
    run_sql(direct, f"insert into {table} values (1, 1)")
    script = (
        "\\set VERBOSITY verbose\n"
        "\\set SHOW_CONTEXT always\n"
        f"insert into {table} values (1, 5);\n"
        f"insert into {table} values (2, -5);\n"
        "do $$ begin raise exception 'boom %', 7 using detail = 'the detail', hint = 'the hint', "
        "errcode = 'U0042'; end $$;\n"
        f"select id, nosuch from {table};\n"
        "select 'still here' as alive;\n"
    )
    through = psql(proxy.dsn(), stdin=script, stop_on_error=False)
    same_psql(through, psql(direct, stdin=script, stop_on_error=False))
    err = through.stderr
    for text in (
        "ERROR:  23505: duplicate key value",
        "DETAIL:  Key (id)=(1) already exists.",
        f"TABLE NAME:  {table}",
        "CONSTRAINT NAME:  qty_positive",
        "ERROR:  U0042: boom 7",
        "HINT:  the hint",
        "LOCATION:  ",
        "LINE 1: select id, nosuch from",
    ):
        assert text in err, err
    assert "still here" in through.stdout


# =========================================================================================
# psycopg 3
# =========================================================================================

PARAM_QUERY = (
    "select %s::int + 1, %s::text || '!', %s::numeric * 2, %s::jsonb -> 'a', %s::bytea, "
    "%s::timestamptz, %s::int[], %s::uuid, %s::text is null, %s::float8, %s::bool"
)
PARAMS = (
    41,
    "héllo\tthere",
    Decimal("1.25"),
    Jsonb({"a": [1, 2, {"b": None}]}),
    b"\x00\xff\x10",
    datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    [1, 2, None],
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    None,
    1e-300,
    True,
)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_params_and_result_formats(proxy: ProxyThread, direct: str, binary: bool) -> None:
    def run(dsn: str) -> list[Any]:
        with psycopg.connect(dsn) as conn:
            cur = conn.cursor(binary=binary)
            rows = cur.execute(PARAM_QUERY, PARAMS).fetchall()
            many = cur.execute(
                "select g, g::text, g * 1.5, now() - now(), array[g, g], row(g, 'x')::text "
                "from generate_series(1, 2000) g"
            ).fetchall()
            return [rows, [d.type_code for d in cur.description or []], many, cur.pgresult and cur.pgresult.fformat(0)]

    through = run(proxy.dsn())
    assert through == run(direct)
    assert through[0][0][:3] == (42, "héllo\tthere!", Decimal("2.50"))
    assert through[3] == (1 if binary else 0)


def transaction_scenario(dsn: str, table: str, direct: str) -> list[Any]:
    obs: list[Any] = []

    def visible() -> Any:
        return run_sql(direct, f"select coalesce(array_agg(id order by id), '{{}}') from {table}")[0][0]

    with psycopg.connect(dsn) as conn:
        obs.append(conn.info.transaction_status)
        conn.execute(f"insert into {table} values (%s)", (1,))
        obs += [conn.info.transaction_status, visible()]
        conn.commit()
        obs += [conn.info.transaction_status, visible()]
        conn.execute(f"insert into {table} values (%s)", (2,))
        conn.rollback()
        obs += [conn.info.transaction_status, visible()]
        with conn.transaction():
            conn.execute(f"insert into {table} values (3)")
            try:
                with conn.transaction():  # a savepoint
                    conn.execute(f"insert into {table} values (4)")
                    conn.execute(f"insert into {table} values (3)")
            except psycopg.errors.UniqueViolation as exc:
                obs.append(("savepoint rolled back", exc.sqlstate))
            obs.append(conn.info.transaction_status)
        obs += [conn.info.transaction_status, visible()]
        try:
            conn.execute("select 1/0")
        except psycopg.errors.DivisionByZero as exc:
            obs.append(str(exc))
        obs.append(conn.info.transaction_status)
        try:
            conn.execute("select 1")
        except psycopg.errors.InFailedSqlTransaction as exc:
            obs.append(str(exc))
        conn.rollback()
        obs.append(conn.info.transaction_status)
        conn.autocommit = True
        obs.append(conn.execute("select 'autocommit'").fetchone())
        obs.append(conn.info.transaction_status)
    return obs


def test_psycopg_transactions(proxy: ProxyThread, direct: str, new_table: Callable[[str], str]) -> None:
    table = new_table("(id int primary key)")
    expected = transaction_scenario(direct, table, direct)
    run_sql(direct, f"truncate {table}")
    through = transaction_scenario(proxy.dsn(), table, direct)
    assert through == expected
    assert through[:7] == [TS.IDLE, TS.INTRANS, [], TS.IDLE, [1], TS.IDLE, [1]]
    assert TS.INERROR in through


def pipeline_scenario(dsn: str, table: str, check: Callable[[psycopg.Connection[Any]], None]) -> list[Any]:
    """psycopg raises a pipeline error wherever it first reads it, so the failing statements sleep
    a little first: every later statement is queued by then and the error surfaces at the end of
    the block, the same way on every run."""
    obs: list[Any] = []

    def err(exc: psycopg.Error) -> tuple[str, str | None, str]:
        return (type(exc).__name__, exc.sqlstate, str(exc))

    def fetched(cur: psycopg.Cursor[Any]) -> Any:
        try:
            return cur.fetchone()
        except psycopg.Error as exc:
            return ("fetch", type(exc).__name__)

    for autocommit in (False, True):
        with psycopg.connect(dsn, autocommit=autocommit) as conn:
            base = 100 if autocommit else 0
            with conn.pipeline() as p:
                c1 = conn.execute(f"insert into {table} values (%s) returning id * 10", (base + 1,))
                c2 = conn.execute(f"insert into {table} values (%s) returning id * 10", (base + 2,))
                c3 = conn.execute(f"select count(*) from {table}")
                p.sync()
                obs += [c1.fetchone(), c2.fetchone(), c3.fetchone(), conn.info.transaction_status]
            try:
                with conn.pipeline():
                    c4 = conn.execute(f"insert into {table} values (%s) returning id", (base + 3,))
                    c5 = conn.execute(f"insert into {table} select %s from pg_sleep(0.1)", (base + 1,))  # dup
                    c6 = conn.execute(f"select count(*) from {table}")
                    c6b = conn.execute(f"insert into {table} values (%s) returning id", (base + 5,))
            except psycopg.Error as exc:
                obs.append(("failed", *err(exc)))
            obs += [fetched(c4), fetched(c5), fetched(c6), fetched(c6b), conn.info.transaction_status]
            if not autocommit:
                conn.rollback()
            with conn.pipeline() as p:
                c7 = conn.execute(f"insert into {table} values (%s) returning id", (base + 4,))
                c8 = conn.execute("select pg_sleep(0), 'after'")
                p.sync()
                obs += [c7.fetchone(), c8.fetchone()]
            try:
                with conn.pipeline():
                    conn.execute("select 1 / (count(*) - 1)::int from pg_sleep(0.1)")
                    c9 = conn.execute("select 'never'")
            except psycopg.Error as exc:
                obs.append(("failed", *err(exc)))
            obs += [fetched(c9), conn.info.transaction_status]
            if not autocommit:
                conn.rollback()
            obs.append(conn.execute(f"select array_agg(id order by id) from {table}").fetchone())
            check(conn)
    return obs


def test_psycopg_pipeline_with_a_failure(proxy: ProxyThread, direct: str, new_table: Callable[[str], str]) -> None:
    table = new_table("(id int primary key)")
    expected = pipeline_scenario(direct, table, lambda conn: None)
    run_sql(direct, f"truncate {table}")
    through = pipeline_scenario(proxy.dsn(), table, lambda conn: assert_fifo_idle(proxy, conn.info.backend_pid))
    assert through == expected
    assert any(isinstance(o, tuple) and "UniqueViolation" in o for o in through)


ROWS = 50_000


def copy_rows() -> list[tuple[Any, ...]]:
    return [
        (i, f"name-{i}\twith tab", None if i % 7 == 0 else Decimal(i) / 4, bytes([i % 256]) * (i % 5))
        for i in range(ROWS)
    ]


def test_psycopg_copy(proxy: ProxyThread, direct: str, new_table: Callable[[str], str]) -> None:
    table = new_table("(id int primary key, name text, score numeric, blob bytea)")
    rows = copy_rows()
    with psycopg.connect(proxy.dsn()) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"copy {table} from stdin") as copy:
                for row in rows[: ROWS // 2]:
                    copy.write_row(row)
            assert cur.rowcount == ROWS // 2
            with cur.copy(f"copy {table} from stdin (format binary)") as copy:
                copy.set_types(["int4", "text", "numeric", "bytea"])
                for row in rows[ROWS // 2 :]:
                    copy.write_row(row)
        conn.commit()
        # A COPY the client aborts: CopyFail, the server's error, the transaction rolls back.
        with (
            conn.cursor() as cur,
            pytest.raises(psycopg.errors.QueryCanceled),
            cur.copy(f"copy {table} from stdin") as copy,
        ):
            copy.write_row((ROWS + 1, "x", None, b""))
            raise psycopg.errors.QueryCanceled("client gave up")
        assert conn.info.transaction_status == TS.INERROR
        conn.rollback()
        assert conn.execute(f"select count(*) from {table}").fetchone() == (ROWS,)
        assert_fifo_idle(proxy, conn.info.backend_pid)

    def copy_out(dsn: str) -> tuple[bytes, bytes, list[tuple[Any, ...]]]:
        with psycopg.connect(dsn) as conn, conn.cursor() as cur:
            with cur.copy(f"copy (select * from {table} order by id) to stdout") as copy:
                text = b"".join(bytes(chunk) for chunk in copy)
            with cur.copy(f"copy (select * from {table} order by id) to stdout (format binary)") as copy:
                binary = b"".join(bytes(chunk) for chunk in copy)
            with cur.copy(f"copy (select * from {table} order by id) to stdout") as copy:
                copy.set_types(["int4", "text", "numeric", "bytea"])
                decoded = list(copy.rows())
            return text, binary, decoded

    through = copy_out(proxy.dsn())
    assert through == copy_out(direct)
    assert through[2] == rows
    assert len(through[0]) > 1_000_000


def test_psycopg_extended_protocol_copy_in(proxy: ProxyThread, direct: str, new_table: Callable[[str], str]) -> None:
    """COPY sent with Parse/Bind/Execute/Sync (libpq PQexecParams): the server ignores the Sync
    that arrives during copy-in mode and answers only the one libpq sends after CopyDone."""
    table = new_table("(id int)")

    def wait(gen: Any, pgconn: pq.abc.PGconn) -> Any:
        return waiting.wait(gen, pgconn.socket, interval=0.1)  # Python-level waits: timeouts work

    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pgconn = conn.pgconn
        for attempt in range(2):
            pgconn.send_query_params(f"copy {table} from stdin".encode(), None)
            (result,) = wait(generators.execute(pgconn), pgconn)
            assert result.status == pq.ExecStatus.COPY_IN
            wait(generators.copy_to(pgconn, b"".join(b"%d\n" % i for i in range(1000))), pgconn)
            if attempt == 0:
                final = wait(generators.copy_end(pgconn, None), pgconn)
                assert final.status == pq.ExecStatus.COMMAND_OK, final.error_message
            else:
                with pytest.raises(psycopg.errors.QueryCanceled, match="client abort"):
                    wait(generators.copy_end(pgconn, b"client abort"), pgconn)
            assert wait(generators.fetch(pgconn), pgconn) is None
            assert conn.info.transaction_status == TS.IDLE
            assert_fifo_idle(proxy, conn.info.backend_pid)
        assert conn.execute(f"select count(*) from {table}").fetchone() == (1000,)
        # Errors in later extended-protocol requests still line up with their own request.
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select %s::int / 0", (1,))
        assert conn.execute("select %s::int", (5,)).fetchone() == (5,)
        assert_fifo_idle(proxy, conn.info.backend_pid)


def test_psycopg_server_side_cursor(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        name = uid("cur")
        with conn.cursor(name=name) as cur:
            cur.itersize = 333
            cur.execute("select g, repeat('x', g % 50) from generate_series(1, 5000) g order by g")
            seen = [row[0] for row in cur]
            # A real server-side cursor, still open on the backend after the last batch.
            assert conn.execute("select name from pg_cursors").fetchall() == [(name,)]
        assert seen == list(range(1, 5001))
        with conn.cursor(name=uid("cur"), scrollable=True) as cur:
            cur.execute("select g from generate_series(1, 100) g")
            assert cur.fetchmany(10) == [(i,) for i in range(1, 11)]
            cur.scroll(50, mode="absolute")
            assert cur.fetchone() == (51,)
            cur.scroll(-5)
            assert cur.fetchone() == (47,)
        conn.commit()


def test_psycopg_prepared_statements(proxy: ProxyThread, direct: str) -> None:
    def run(dsn: str) -> list[Any]:
        with psycopg.connect(dsn, prepare_threshold=0, autocommit=True) as conn:
            results = [conn.execute("select %s::int * 2, %s::text", (i, f"v{i}")).fetchone() for i in range(50)]
            results.append(conn.execute("select %s::int + %s::int", (1, 2), prepare=True).fetchone())
            prepared = conn.execute(
                "select statement, parameter_types::text from pg_prepared_statements order by statement",
                prepare=False,
            ).fetchall()
            # A prepared statement that starts failing (the table changed under it) and recovers.
            name = uid()
            conn.execute(f"create temp table {name} (a int)", prepare=False)
            conn.execute(f"insert into {name} values (%s)", (1,))
            conn.execute(f"select * from {name} where a = %s", (1,))
            conn.execute(f"alter table {name} alter column a type text", prepare=False)
            try:
                again = conn.execute(f"select * from {name} where a = %s", (1,)).fetchall()
            except psycopg.Error as exc:
                again = [(type(exc).__name__, exc.sqlstate)]
            return [results, prepared, again]

    through = run(proxy.dsn())
    assert through == run(direct)
    assert any("select $1::int * 2" in stmt for stmt, _ in through[1])


async def test_psycopg_async(proxy: ProxyThread, direct: str, new_table: Callable[[str], str]) -> None:
    table = new_table("(id int primary key, name text)")

    async def run(dsn: str) -> list[Any]:
        obs: list[Any] = []
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            obs.append(await (await conn.execute(PARAM_QUERY, PARAMS)).fetchall())
            async with conn.cursor() as cur, cur.copy(f"copy {table} from stdin") as copy:
                for i in range(ROWS):
                    await copy.write_row((i, f"n{i}"))
            obs.append(conn.info.transaction_status)
            await conn.commit()
            async with conn.transaction():
                await conn.execute(f"delete from {table} where id < 10")
            try:
                async with conn.transaction():
                    await conn.execute(f"insert into {table} values (1, 'a'), (1, 'b')")
            except psycopg.errors.UniqueViolation as exc:
                obs.append(exc.diag.message_detail)
            async with conn.cursor(name="acur") as cur:
                cur.itersize = 1000
                await cur.execute(f"select id from {table} order by id")
                obs.append([row[0] async for row in cur][:3])
            await conn.rollback()
            async with conn.pipeline() as p:
                c1 = await conn.execute(f"select count(*) from {table}")
                c2 = await conn.execute("select %s::text", ("piped",))
                await p.sync()
                obs += [await c1.fetchone(), await c2.fetchone()]
            async with conn.cursor() as cur, cur.copy(f"copy (select * from {table} order by id) to stdout") as copy:
                obs.append(len(b"".join([bytes(c) async for c in copy])))
            obs.append(conn.info.transaction_status)
            await conn.rollback()
        return obs

    expected = await run(direct)
    run_sql(direct, f"truncate {table}")
    through = await run(proxy.dsn())
    assert through == expected
    assert through[-4:-2] == [(ROWS - 10,), ("piped",)]


# =========================================================================================
# asyncpg
# =========================================================================================


async def test_asyncpg_prepared_executemany_transactions(
    proxy: ProxyThread, direct: str, new_table: Callable[[str], str]
) -> None:
    table = new_table("(id int primary key, name text, score float8)")

    async def run(dsn: str) -> list[Any]:
        obs: list[Any] = []
        conn = await asyncpg.connect(dsn)
        try:
            stmt = await conn.prepare("select $1::int * 2 as doubled, $2::text as label")
            obs.append([tuple(a.name for a in stmt.get_attributes()), [p.name for p in stmt.get_parameters()]])
            obs.append([tuple(await stmt.fetchrow(i, f"l{i}")) for i in range(100)])
            obs.append(await conn.fetchval("select $1::int[]", [1, None, 3]))
            await conn.executemany(
                f"insert into {table} values ($1, $2, $3)", [(i, f"n{i}", i / 3) for i in range(1000)]
            )
            obs.append(await conn.fetchrow(f"select count(*), sum(id), max(name) from {table}"))
            async with conn.transaction():
                await conn.execute(f"delete from {table} where id < 100")
                try:
                    async with conn.transaction():  # savepoint
                        await conn.execute(f"insert into {table} values (500, 'dup', 0)")
                except asyncpg.UniqueViolationError as exc:
                    obs.append((exc.sqlstate, exc.constraint_name))
            tx = conn.transaction()
            await tx.start()
            await conn.execute(f"delete from {table}")
            await tx.rollback()
            obs.append(await conn.fetchval(f"select count(*) from {table}"))
            try:
                await conn.executemany(f"insert into {table} values ($1, 'x', 0)", [(2000,), (2001,), (2000,)])
            except asyncpg.UniqueViolationError as exc:
                obs.append(exc.detail)
            obs.append(await conn.fetchval(f"select count(*) from {table}"))
            obs.append(conn.is_in_transaction())
        finally:
            await conn.close()
        return obs

    expected = await run(direct)
    run_sql(direct, f"truncate {table}")
    assert await run(proxy.dsn()) == expected


async def test_asyncpg_copy(proxy: ProxyThread, direct: str, new_table: Callable[[str], str]) -> None:
    table = new_table("(id int primary key, name text, at timestamptz, raw bytea)")
    records = [(i, f"name {i}\n", datetime(2024, 1, 1, tzinfo=UTC), bytes(range(i % 256))) for i in range(20_000)]
    conn = await asyncpg.connect(proxy.dsn())
    try:
        assert await conn.copy_records_to_table(table, records=records) == "COPY 20000"
        buf = io.BytesIO()
        status = await conn.copy_from_query(f"select * from {table} order by id", output=buf)
        assert status == "COPY 20000"
        assert [tuple(r) for r in await conn.fetch(f"select * from {table} order by id")] == records
    finally:
        await conn.close()

    direct_conn = await asyncpg.connect(direct)
    try:
        expected = io.BytesIO()
        await direct_conn.copy_from_query(f"select * from {table} order by id", output=expected)
    finally:
        await direct_conn.close()
    assert buf.getvalue() == expected.getvalue()
    assert len(buf.getvalue()) > 2_000_000


@pytest.mark.timeout(20)
async def test_asyncpg_timeout_cancels_the_query(proxy: ProxyThread, direct: str) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    watcher = await asyncpg.connect(direct)
    try:
        pid = conn.get_server_pid()
        assert pid == await conn.fetchval("select pg_backend_pid()")
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("select pg_sleep(10)", timeout=0.5)
            assert time.monotonic() - started < 3
            # Usable at once: the query was cancelled, not left running until it ends by itself.
            assert await conn.fetchval("select 'usable'") == "usable"
            assert time.monotonic() - started < 3
            running = await watcher.fetchval(
                "select count(*) from pg_stat_activity where pid = $1 and query like '%pg_sleep(10)%' "
                "and state = 'active'",
                pid,
            )
            assert running == 0
        async with conn.transaction():
            assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()
        await watcher.close()


# =========================================================================================
# pgbench
# =========================================================================================


@pytest.fixture(scope="module")
def bench_db(proxy: ProxyThread, pg_cluster: LocalCluster) -> Iterator[str]:
    name = uid("bench")
    run_sql(pg_cluster.dsn(), f"create database {name}")
    try:
        init = subprocess.run(
            ["pgbench", "-i", "-s", "1", "-q", "-d", proxy.dsn(dbname=name)],
            capture_output=True,
            text=True,
            env=CLIENT_ENV,
            timeout=60,
        )
        assert init.returncode == 0, init.stderr
        assert "done in" in init.stderr
        assert run_sql(pg_cluster.dsn(dbname=name), "select count(*) from pgbench_accounts") == [(100_000,)]
        yield name
    finally:
        run_sql(pg_cluster.dsn(), f"drop database if exists {name} with (force)")


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(proxy: ProxyThread, pg_cluster: LocalCluster, bench_db: str, mode: str) -> None:
    before = run_sql(pg_cluster.dsn(dbname=bench_db), "select count(*) from pgbench_history")[0][0]
    run = subprocess.run(
        ["pgbench", "-n", "-t", "200", "-c", "4", "-j", "2", "-M", mode, "-d", proxy.dsn(dbname=bench_db)],
        capture_output=True,
        text=True,
        env=CLIENT_ENV,
        timeout=60,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "error" not in output.lower(), output
    assert "number of transactions actually processed: 800/800" in run.stdout, output
    after = run_sql(pg_cluster.dsn(dbname=bench_db), "select count(*) from pgbench_history")[0][0]
    assert after - before == 800


# =========================================================================================
# LISTEN/NOTIFY, notices
# =========================================================================================


@pytest.mark.timeout(20)
def test_psycopg_listen_notify(proxy: ProxyThread, direct: str) -> None:
    channel = uid("ch")
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as listener,
        psycopg.connect(proxy.dsn(), autocommit=True) as via_proxy,
        psycopg.connect(direct, autocommit=True) as via_direct,
    ):
        listener.execute(f"listen {channel}")
        via_proxy.execute("select pg_notify(%s, %s)", (channel, "through the proxy"))
        via_direct.execute(f"notify {channel}, 'directly ü'")
        got = [(n.channel, n.payload, n.pid) for n in listener.notifies(timeout=5, stop_after=2)]
        assert got == [
            (channel, "through the proxy", via_proxy.info.backend_pid),
            (channel, "directly ü", via_direct.info.backend_pid),
        ]
        # One that arrives while the listener is busy with a query of its own.
        handled: list[str] = []
        listener.add_notify_handler(lambda n: handled.append(n.payload))
        via_direct.execute(f"notify {channel}, 'during a query'")
        time.sleep(0.2)
        listener.execute("select 1")
        assert handled == ["during a query"]


@pytest.mark.timeout(20)
async def test_asyncpg_listener(proxy: ProxyThread, direct: str) -> None:
    channel = uid("ch")
    received: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
    listener = await asyncpg.connect(proxy.dsn())
    notifier = await asyncpg.connect(direct)
    try:
        await listener.add_listener(channel, lambda _c, pid, ch, payload: received.put_nowait((ch, payload, pid)))
        await notifier.execute("select pg_notify($1, $2)", channel, "p" * 5000)
        assert await asyncio.wait_for(received.get(), 5) == (channel, "p" * 5000, notifier.get_server_pid())
    finally:
        await listener.close()
        await notifier.close()


NOTICE_SQL = [
    "do $$ begin raise notice 'hello %', 42; end $$",
    "do $$ begin raise warning 'careful: %', 'x' using detail = 'dd', hint = 'hh'; end $$",
]


def notice_scenario(dsn: str) -> list[Any]:
    notices: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(
            lambda d: notices.append(
                (
                    d.severity,
                    d.severity_nonlocalized,
                    d.sqlstate,
                    d.message_primary,
                    d.message_detail,
                    d.message_hint,
                    d.context,
                    d.source_function,
                )
            )
        )
        for stmt in NOTICE_SQL:
            conn.execute(stmt)
        conn.execute("drop table if exists no_such_table_pgshift")  # NOTICE from the server itself
        with conn.pipeline():
            conn.execute("do $$ begin raise notice 'in a pipeline'; end $$")
            conn.execute("select %s::int", (1,))
    return notices


def test_notices_and_warnings(proxy: ProxyThread, direct: str) -> None:
    through = notice_scenario(proxy.dsn())
    assert through == notice_scenario(direct)
    assert [n[:4] for n in through] == [
        ("NOTICE", "NOTICE", "00000", "hello 42"),
        ("WARNING", "WARNING", "01000", "careful: x"),
        ("NOTICE", "NOTICE", "00000", 'table "no_such_table_pgshift" does not exist, skipping'),
        ("NOTICE", "NOTICE", "00000", "in a pipeline"),
    ]
    assert through[1][4:6] == ("dd", "hh")


async def test_asyncpg_log_listener(proxy: ProxyThread) -> None:
    got: list[tuple[str, str]] = []
    conn = await asyncpg.connect(proxy.dsn())
    try:
        conn.add_log_listener(lambda _c, msg: got.append((msg.severity, msg.message)))
        await conn.execute("do $$ begin raise notice 'hello %', 42; raise warning 'w'; end $$")
        await asyncio.sleep(0.05)
    finally:
        await conn.close()
    assert got == [("NOTICE", "hello 42"), ("WARNING", "w")]


# =========================================================================================
# Errors with all their fields
# =========================================================================================

DIAG_FIELDS = (
    "severity",
    "severity_nonlocalized",
    "sqlstate",
    "message_primary",
    "message_detail",
    "message_hint",
    "statement_position",
    "internal_position",
    "internal_query",
    "context",
    "schema_name",
    "table_name",
    "column_name",
    "datatype_name",
    "constraint_name",
    "source_file",
    "source_line",
    "source_function",
)

ERROR_CASES: dict[str, tuple[str, tuple[Any, ...] | None, dict[str, Any]]] = {
    "unique": (
        "insert into {t} values (1, 5)",
        None,
        {"sqlstate": "23505", "constraint_name": "{t}_pkey", "message_detail": "Key (id)=(1) already exists."},
    ),
    "unique-extended": ("insert into {t} values (%s, %s)", (1, 5), {"sqlstate": "23505", "table_name": "{t}"}),
    "check": (
        "insert into {t} values (2, -1)",
        None,
        {"sqlstate": "23514", "constraint_name": "qty_positive", "schema_name": "public", "table_name": "{t}"},
    ),
    "not-null": ("insert into {t} (id, qty) values (null, 1)", None, {"sqlstate": "23502", "column_name": "id"}),
    "raise": (
        "do $$ begin raise exception 'custom %', 7 using detail = 'the detail', hint = 'the hint', "
        "errcode = 'U0042'; end $$",
        None,
        {
            "sqlstate": "U0042",
            "message_primary": "custom 7",
            "message_detail": "the detail",
            "message_hint": "the hint",
        },
    ),
    "position": ("select id, nosuchcol from {t}", None, {"sqlstate": "42703", "statement_position": "12"}),
    "internal": (
        "do $$ begin perform nosuch_fn(1); end $$",
        None,
        {"sqlstate": "42883", "internal_position": "8", "internal_query": "SELECT nosuch_fn(1)"},
    ),
    "division": ("select 1/0", None, {"sqlstate": "22012", "severity": "ERROR"}),
}


@pytest.fixture
def error_table(direct: str, new_table: Callable[[str], str]) -> str:
    table = new_table("(id int primary key, qty int constraint qty_positive check (qty > 0))")
    run_sql(direct, f"insert into {table} values (1, 1)")
    return table


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_fields_psycopg(proxy: ProxyThread, direct: str, error_table: str, case: str) -> None:
    statement, params, must = ERROR_CASES[case]

    def diag(dsn: str) -> dict[str, Any]:
        with psycopg.connect(dsn) as conn:
            with pytest.raises(psycopg.Error) as info:
                conn.execute(statement.format(t=error_table), params)
            assert conn.info.transaction_status == TS.INERROR
            conn.rollback()
            assert conn.execute("select 'ok'").fetchone() == ("ok",)
            exc = info.value
            return {"type": type(exc).__name__, "str": str(exc)} | {f: getattr(exc.diag, f) for f in DIAG_FIELDS}

    through = diag(proxy.dsn())
    assert through == diag(direct)
    for field, value in must.items():
        assert through[field] == value.format(t=error_table)


@pytest.mark.parametrize("case", ["unique", "check", "raise", "position"])
async def test_error_fields_asyncpg(proxy: ProxyThread, direct: str, error_table: str, case: str) -> None:
    statement = ERROR_CASES[case][0].format(t=error_table)

    async def fields(dsn: str) -> dict[str, Any]:
        conn = await asyncpg.connect(dsn)
        try:
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.execute(statement)
            assert await conn.fetchval("select 'ok'") == "ok"
        finally:
            await conn.close()
        return {"type": type(info.value).__name__, **info.value.as_dict()}

    through = await fields(proxy.dsn())
    assert through == await fields(direct)
    assert through["sqlstate"] == ERROR_CASES[case][2]["sqlstate"]


# =========================================================================================
# ParameterStatus, BackendKeyData
# =========================================================================================

REPORTED = (
    "server_version",
    "server_encoding",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "integer_datetimes",
    "standard_conforming_strings",
    "TimeZone",
    "is_superuser",
    "session_authorization",
    "application_name",
    "default_transaction_read_only",
    "in_hot_standby",
)


def test_parameter_status_and_backend_key(proxy: ProxyThread, direct: str) -> None:
    def params(conn: psycopg.Connection[Any]) -> dict[str, str | None]:
        return {name: conn.info.parameter_status(name) for name in REPORTED}

    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as p,
        psycopg.connect(direct, autocommit=True) as d,
    ):
        assert params(p) == params(d)
        assert p.info.server_version == d.info.server_version
        assert p.info.backend_pid == p.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        for conn in (p, d):
            conn.execute("set application_name = 'pgshift-test'")
            conn.execute("set TimeZone = 'Asia/Kathmandu'")
            conn.execute("set DateStyle = 'SQL, DMY'")
        assert params(p) == params(d)
        assert p.info.parameter_status("application_name") == "pgshift-test"
        assert p.info.parameter_status("TimeZone") == "Asia/Kathmandu"
        assert p.info.parameter_status("DateStyle") == "SQL, DMY"
        for conn in (p, d):  # a SET rolled back: the server reports the old value again
            with conn.transaction(force_rollback=True):
                conn.execute("set local application_name = 'inside'")
                assert conn.info.parameter_status("application_name") == "inside"
        assert params(p) == params(d)
        for conn in (p, d):
            conn.execute("reset all")
        assert params(p) == params(d)

    # Startup parameters the client sends reach the backend and come back as ParameterStatus.
    with psycopg.connect(proxy.dsn(application_name="from-startup", options="-c%20TimeZone%3DEurope/Paris")) as p:
        assert p.info.parameter_status("application_name") == "from-startup"
        assert p.info.parameter_status("TimeZone") == "Europe/Paris"
        assert p.execute("show application_name").fetchone() == ("from-startup",)


async def test_asyncpg_server_identity(proxy: ProxyThread, direct: str) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    other = await asyncpg.connect(direct)
    try:
        assert conn.get_server_pid() == await conn.fetchval("select pg_backend_pid()")
        assert conn.get_server_version() == other.get_server_version()
        assert conn.get_settings().server_version == other.get_settings().server_version
        await conn.execute("set TimeZone = 'America/Lima'")
        assert conn.get_settings().TimeZone == "America/Lima"
        # pg_terminate_backend on the pid the client was given ends this very session.
        assert await other.fetchval("select pg_terminate_backend($1)", conn.get_server_pid())
        for _ in range(100):
            if conn.is_closed():
                break
            await asyncio.sleep(0.05)
        assert conn.is_closed()
    finally:
        await conn.close()
        await other.close()


def test_terminated_backend_reports_like_direct(proxy: ProxyThread, direct: str) -> None:
    """The backend's FATAL is the client's only error, exactly as when connected directly."""

    def run(dsn: str) -> tuple[str, str, str | None]:
        with psycopg.connect(dsn) as conn, psycopg.connect(direct, autocommit=True) as other:
            other.execute("select pg_terminate_backend(%s)", (conn.info.backend_pid,))
            time.sleep(0.2)  # the FATAL and the close arrive while the client is idle
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute("select 1")
            assert conn.closed
            return type(info.value).__name__, str(info.value), info.value.sqlstate

    through = run(proxy.dsn())
    assert through == run(direct)
    assert through[0] == "AdminShutdown"
