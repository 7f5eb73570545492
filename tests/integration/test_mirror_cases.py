"""Dual write, the hard cases: protocol corners (Flush before Sync, failed Parse, row limits,
result formats, sync-mode ordering), settings that follow transactions, client encodings, roles
and tables where RETURNING cannot be added. Each asserts what Postgres itself shows a client
(compared byte for byte where it matters) and that old and new end up equal or the journal says
why. Found by a review of the first version: each failed then."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from proxy.localpg import LocalCluster
from proxy.wire.messages import FLUSH, SYNC, Parse, Query
from tests.integration.conftest import TwoClusters
from tests.integration.test_cancel_faults import Raw
from tests.integration.test_mirror import SCHEMA, assert_same, mirror_proxy, rows, wait_applied

pytestmark = pytest.mark.timeout(60)

EXTRA = """
drop schema if exists s2 cascade;
create schema s2;
create table s2.tags (account int, tag text, primary key (account, tag));
"""

ROLE = """
do $$ begin
  if not exists (select from pg_roles where rolname = 'app') then create role app login; end if;
  if not exists (select from pg_roles where rolname = 'app_ins') then create role app_ins login; end if;
end $$;
grant usage on schema public to app, app_ins;
grant select, insert, update, delete on all tables in schema public to app;
grant usage on all sequences in schema public to app, app_ins;
grant insert on audit to app_ins;
"""


@pytest.fixture(scope="module")
def clusters(make_cluster: Callable[..., LocalCluster]) -> TwoClusters:
    return TwoClusters(make_cluster("review-old"), make_cluster("review-new"))


@pytest.fixture
def fresh(clusters: TwoClusters) -> TwoClusters:
    for cluster in (clusters.old, clusters.new):
        cluster.psql("drop schema if exists public cascade; create schema public;" + SCHEMA + EXTRA + ROLE)
    return clusters


# --- raw protocol helpers ---------------------------------------------------------------------------


def _msg(code: bytes, body: bytes) -> bytes:
    return code + struct.pack("!I", len(body) + 4) + body


def bind(
    portal: str = "", stmt: str = "", params: tuple[bytes | None, ...] = (), formats: tuple[int, ...] = ()
) -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    body += struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    return _msg(b"B", body)


def execute(portal: str = "", limit: int = 0) -> bytes:
    return _msg(b"E", portal.encode() + b"\0" + struct.pack("!i", limit))


def describe(kind: bytes, name: str = "") -> bytes:
    return _msg(b"D", kind + name.encode() + b"\0")


def codes(messages: list[tuple[str, bytes]]) -> list[str]:
    return [c for c, _ in messages if c not in "NS"]  # (notices, parameter status aside)


def journal(proxy: Any) -> list[dict[str, Any]]:
    return list(wait_applied(proxy)["recent"])


# --- protocol: the tap's own FIFO -------------------------------------------------------------------


def test_error_before_sync_with_flush_keeps_the_tap_in_step(fresh: TwoClusters) -> None:
    """An error answered before the client's Sync arrived (the request ended with Flush): Postgres
    ignores every message up to Sync. The tap's FIFO must do the same, or every reply after it is
    attributed to the wrong message — here the next INSERT's row-image column reaches the client."""
    proxy = mirror_proxy(fresh)
    try:
        with Raw(proxy.port) as raw:
            raw.startup()
            raw.send(Parse("", "selec 1").encode() + FLUSH)
            assert codes(raw.until("E")) == ["E"]
            raw.send(bind() + execute() + SYNC)  # ignored by Postgres up to the Sync
            assert codes(raw.until("Z")) == ["Z"]
            raw.send(Query("insert into tags values (1, 'after')").encode())
            got = codes(raw.until("Z"))
            assert got == ["C", "Z"], got  # no RowDescription / DataRow of the image column
        wait_applied(proxy)
        assert rows(fresh.new, "tags") == [(1, "after")]
    finally:
        proxy.stop()


# --- settings that change what a write means -------------------------------------------------------


def test_set_local_inside_a_multi_statement_query(fresh: TwoClusters) -> None:
    """A simple Query of several statements is one implicit transaction block: SET LOCAL takes
    effect for the statements after it (no warning). The mirror must apply the write in s2 too."""
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("set local search_path = s2; insert into tags values (1, 'local')")
        journal(proxy)
        assert rows(fresh.old, "s2.tags") == [(1, "local")] and rows(fresh.old, "public.tags") == []
        assert_same(fresh, "s2.tags", "public.tags")
    finally:
        proxy.stop()


def test_set_in_a_failed_implicit_transaction_is_rolled_back(fresh: TwoClusters) -> None:
    """`SET …; <error>` in one Query: the implicit transaction rolls back, the SET with it
    (search_path is not reported by ParameterStatus before PostgreSQL 18)."""
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("set search_path = s2; select 1/0")
            assert conn.execute("show search_path").fetchone() == ('"$user", public',)
            conn.execute("insert into tags values (2, 'public')")
        journal(proxy)
        assert rows(fresh.old, "public.tags") == [(2, "public")]
        assert_same(fresh, "s2.tags", "public.tags")
    finally:
        proxy.stop()


def test_set_undone_by_rollback_to_savepoint(fresh: TwoClusters) -> None:
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("begin")
            conn.execute("savepoint a")
            conn.execute("set search_path = s2")
            conn.execute("rollback to savepoint a")
            conn.execute("insert into tags values (3, 'public')")
            conn.execute("commit")
        journal(proxy)
        assert rows(fresh.old, "public.tags") == [(3, "public")]
        assert_same(fresh, "s2.tags", "public.tags")
    finally:
        proxy.stop()


def test_replayed_update_using_current_user(fresh: TwoClusters) -> None:
    """CURRENT_USER is the client's role on the primary; on the mirror it is mirror_user unless
    the session did SET ROLE: such an UPDATE is captured as row images, not replayed."""
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("insert into accounts (owner) values ('x')")
        with psycopg.connect(proxy.dsn(user="app"), autocommit=True) as conn:
            conn.execute("update accounts set owner = current_user where id = 1")
        status = wait_applied(proxy)
        assert [r[1] for r in rows(fresh.old, "accounts")] == ["app"]
        assert_same(fresh, "accounts")
        assert status["mirrors"][0]["diverged"] == 0, status["recent"]
    finally:
        proxy.stop()


# --- encodings --------------------------------------------------------------------------------------


def test_latin1_client_text_reaches_the_primary_unchanged(fresh: TwoClusters) -> None:
    """A client with client_encoding LATIN1 sends its SQL in LATIN1; the rewrite that adds the row
    image must not re-encode it (as UTF-8, after decoding it as UTF-8 with replacement)."""
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True, client_encoding="latin1") as conn:
            conn.execute("insert into tags values (1, 'café')")
            assert conn.execute("select tag from tags").fetchone() == ("café",)
        wait_applied(proxy)
        assert rows(fresh.old, "tags") == [(1, "café")]
        assert_same(fresh, "tags")
    finally:
        proxy.stop()


# --- the RETURNING rewrite changes what the primary runs ---------------------------------------------


def test_insert_into_a_view_with_a_do_instead_rule(fresh: TwoClusters) -> None:
    """Postgres runs INSERT into a rule-based view; with RETURNING appended it refuses it."""
    for c in (fresh.old, fresh.new):
        c.psql(
            "create view tag_view as select account, tag from tags;"
            "create rule tag_view_ins as on insert to tag_view do instead "
            "insert into tags values (new.account, new.tag);"
        )
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            cur = conn.execute("insert into tag_view values (1, 'via rule')")
            assert cur.rowcount == 1
        assert rows(fresh.old, "tags") == [(1, "via rule")]
    finally:
        proxy.stop()


def test_insert_with_insert_only_privilege(fresh: TwoClusters) -> None:
    """An application role with INSERT but not SELECT on a table (append-only logs, audit): Postgres
    accepts its INSERT; RETURNING row_to_json(t.*) needs SELECT and is refused."""
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(user="app_ins"), autocommit=True) as conn:
            cur = conn.execute("insert into audit (note) values ('append only')")
            assert cur.rowcount == 1
        assert [r[0] for r in rows(fresh.old, "audit")] == ["append only"]
    finally:
        proxy.stop()


# --- replays that are not deterministic --------------------------------------------------------------


def test_copy_that_omits_a_defaulted_column(fresh: TwoClusters) -> None:
    """COPY audit (note) FROM STDIN: `at` takes DEFAULT now() — on the mirror, its own now()."""
    proxy = mirror_proxy(fresh)
    try:
        with (
            psycopg.connect(proxy.dsn(), autocommit=True) as conn,
            conn.cursor().copy("copy audit (note) from stdin") as copy,
        ):
            for k in range(3):
                copy.write_row((f"copied {k}",))
        entries = journal(proxy)
        old, new = rows(fresh.old, "audit"), rows(fresh.new, "audit")
        assert old == new or any("audit" in e["tables"] for e in entries), f"silent divergence: {old} != {new}"
    finally:
        proxy.stop()


def test_search_path_set_with_set_config(fresh: TwoClusters) -> None:
    """SELECT set_config('search_path', …, false) is SET search_path by another name (pg_dump
    scripts, ORMs, connection-pool reset hooks use it)."""
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("select pg_catalog.set_config('search_path', 's2', false)")
            conn.execute("insert into tags values (1, 'in s2')")
        journal(proxy)
        assert rows(fresh.old, "s2.tags") == [(1, "in s2")]
        assert_same(fresh, "s2.tags", "public.tags")
    finally:
        proxy.stop()


# --- the rewritten simple Query ----------------------------------------------------------------------


def test_comment_before_the_semicolon_of_a_multi_statement_query(fresh: TwoClusters) -> None:
    """Statements are joined again with ";\\n" after the rewrite: a `-- comment` that ended right
    before a ';' now swallows it."""
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute(
                "update tags set tag = 'z' where account = 0 -- nothing yet\n; insert into tags values (2, 'b')"
            )
        wait_applied(proxy)
        assert rows(fresh.old, "tags") == [(2, "b")]
        assert_same(fresh, "tags")
    finally:
        proxy.stop()


# --- named statements ---------------------------------------------------------------------------------


def test_failed_parse_of_an_existing_name_does_not_replace_the_statement(fresh: TwoClusters) -> None:
    """Parse of a name that exists fails ("prepared statement … already exists") and the server
    keeps the first statement; the capture must keep replaying that one."""
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("insert into accounts (owner, balance) values ('a', 100)")
        with Raw(proxy.port) as raw:
            raw.startup()
            raw.send(Parse("s1", "update accounts set balance = balance + $1::int where id = $2::int").encode() + SYNC)
            assert codes(raw.until("Z")) == ["1", "Z"]
            raw.send(Parse("s1", "update accounts set balance = balance - $1::int where id = $2::int").encode() + SYNC)
            assert codes(raw.until("Z")) == ["E", "Z"]  # 42P05: already exists
            raw.send(bind("", "s1", (b"10", b"1")) + execute() + SYNC)
            assert codes(raw.until("Z")) == ["2", "C", "Z"]
        entries = journal(proxy)
        assert rows(fresh.old, "accounts", "id")[0][2] == 110
        assert rows(fresh.new, "accounts", "id")[0][2] == 110 or entries, "silent divergence"
    finally:
        proxy.stop()


# --- sync mode ----------------------------------------------------------------------------------------


def test_sync_mode_hold_keeps_replies_in_order_with_reads_elsewhere(fresh: TwoClusters) -> None:
    """Sync mode holds the ReadyForQuery of a commit until the mirror confirmed. A request that
    arrives meanwhile and is served by another backend must not overtake it."""
    import time

    proxy = mirror_proxy(fresh, {"mode": "sync", "sync_timeout": 2}, reads={"new": 100})
    try:
        with psycopg.connect(fresh.new.dsn()) as direct, Raw(proxy.port) as raw:
            raw.startup()
            direct.execute("lock table audit in access exclusive mode")  # the mirror waits
            raw.send(Query("insert into audit (note) values ('held')").encode())
            time.sleep(0.5)
            raw.send(Query("select count(*) from tags").encode())
            got = codes(raw.until("Z")) + codes(raw.until("Z"))
            direct.rollback()
            assert got == ["C", "Z", "T", "D", "C", "Z"], got
    finally:
        proxy.stop()


# --- tricky cases that work: the client sees what Postgres sends ----------------------------------------


def _exchange(port: int, data: bytes, readies: int, user: str = "postgres") -> list[tuple[str, bytes]]:
    with Raw(port) as raw:
        raw.startup(user=user)
        raw.send(data)
        out: list[tuple[str, bytes]] = []
        for _ in range(readies):
            out += [m for m in raw.until("Z") if m[0] not in "NS"]
        return out


def _same_as_postgres(two: TwoClusters, proxy: Any, data: bytes, readies: int) -> list[tuple[str, bytes]]:
    """Run ``data`` inside BEGIN … ROLLBACK on the old cluster directly, then inside BEGIN … COMMIT
    through the proxy: the messages must be identical."""
    begin = Query("begin").encode()
    direct = _exchange(two.old.port, begin + data + Query("rollback").encode(), readies + 2)
    through = _exchange(proxy.port, begin + data + Query("commit").encode(), readies + 2)
    assert through[:-2] == direct[:-2]
    return through


CASES = {
    # (Postgres' tag for the last portion counts the rows of that Execute: INSERT 0 1; pgshift sends
    # the tag of the server's second Execute of the exhausted portal, INSERT 0 0.)
    "row limits on a write with RETURNING": (
        Parse("", "insert into tags select g, 'r' from generate_series(1, 3) g returning account, tag").encode()
        + bind("p1")
        + execute("p1", 2)
        + execute("p1", 2)
        + execute("p1", 2)
        + execute("p1", 2)
        + SYNC,
        1,
    ),
    "row limit equal to the row count, then Close": (
        Parse("", "insert into tags select g, 'q' from generate_series(1, 2) g returning *").encode()
        + bind("p2")
        + execute("p2", 2)
        + _msg(b"C", b"Pp2\0")
        + SYNC,
        1,
    ),
    "describe statement and portal, binary results": (
        Parse("s", "insert into tags values ($1::int, $2::text) returning tag, account").encode()
        + describe(b"S", "s")
        + bind("", "s", (b"5", b"x"), (1, 0))
        + describe(b"P")
        + execute()
        + SYNC
        + Parse("n", "insert into tags values ($1::int, $2::text)").encode()
        + describe(b"S", "n")
        + bind("", "n", (b"6", b"y"), (1,))
        + describe(b"P")
        + execute()
        + SYNC
        + Parse("u", "update tags set tag = tag || $1 where account = $2::int returning *").encode()
        + describe(b"S", "u")
        + bind("pu", "u", (b"!", b"5"), (1,))
        + describe(b"P", "pu")
        + execute("pu")
        + SYNC,
        3,
    ),
    "error in the second of three pipelined Syncs": (
        Parse("", "insert into tags values (10, 'a')").encode()
        + bind()
        + execute()
        + SYNC
        + Parse("", "insert into tags values (1/0, 'b')").encode()
        + bind()
        + execute()
        + SYNC
        + Query("rollback; begin").encode()
        + Parse("", "insert into tags values (11, 'c')").encode()
        + bind()
        + execute()
        + SYNC,
        4,
    ),
    "empty query and comment-only query": (Query("").encode() + Query("-- nothing").encode(), 2),
    "update with RETURNING and row limit 1 (asyncpg fetchrow)": (
        Query("insert into tags values (1, 'x'), (2, 'x')").encode()
        + Parse("", "update tags set tag = 'y' where tag = 'x' returning account").encode()
        + bind()
        + execute("", 1)
        + SYNC,
        2,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_protocol_cases_match_postgres(fresh: TwoClusters, case: str) -> None:
    data, readies = CASES[case]
    proxy = mirror_proxy(fresh)
    try:
        _same_as_postgres(fresh, proxy, data, readies)
        status = wait_applied(proxy)
        assert_same(fresh, "tags", "accounts")
        assert status["mirrors"][0]["diverged"] == status["mirrors"][0]["failed"] == 0, status["recent"]
    finally:
        proxy.stop()


def test_commit_and_chain_and_big_rows(fresh: TwoClusters) -> None:
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("begin")
            conn.execute("insert into tags values (1, 'first')")
            conn.execute("commit and chain")
            conn.execute("insert into tags values (2, 'chained')")
            conn.execute("rollback and chain")
            conn.execute("insert into tags values (3, 'after rollback')")
            conn.execute("commit")
            big = "x" * 3_000_000
            cur = conn.execute("insert into audit (note) values (%s) returning length(note)", (big,))
            assert cur.fetchone() == (3_000_000,)
            cur = conn.execute("update audit set note = note || 'y' returning note")
            assert len(cur.fetchone()[0]) == 3_000_001
        status = wait_applied(proxy)
        assert rows(fresh.new, "tags") == [(1, "first"), (3, "after rollback")]
        assert_same(fresh, "tags", "audit")
        assert status["mirrors"][0]["diverged"] == status["mirrors"][0]["failed"] == 0, status["recent"]
    finally:
        proxy.stop()


def test_copy_fail_and_extended_copy(fresh: TwoClusters) -> None:
    proxy = mirror_proxy(fresh)
    try:
        with (
            psycopg.connect(proxy.dsn(), autocommit=True) as conn,
            pytest.raises(RuntimeError),
            conn.cursor().copy("copy tags from stdin") as copy,
        ):
            copy.write_row((1, "never"))
            raise RuntimeError("client gives up")  # psycopg sends CopyFail
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            with conn.cursor().copy("copy tags from stdin") as copy:
                copy.write_row((2, "kept"))
            conn.execute("set search_path = s2")
            conn.execute("insert into tags values (3, 's2')")
        wait_applied(proxy)
        assert rows(fresh.new, "tags") == [(2, "kept")]
        assert_same(fresh, "tags", "s2.tags")
    finally:
        proxy.stop()


def test_flip_with_prepared_rewritten_statements(fresh: TwoClusters) -> None:
    """Statements prepared (rewritten) on the old primary are re-prepared on the new one after a
    flip; the client still sees only its own columns, and writes flow back to old."""
    import httpx

    from tests.integration.test_mirror import TOKEN

    proxy = mirror_proxy(fresh)
    try:
        with (
            psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn,
            httpx.Client(base_url=proxy.admin_url, headers={"Authorization": f"Bearer {TOKEN}"}) as admin,
        ):
            ins = "insert into tags values (%s, %s)"
            ret = "insert into tags values (%s, %s) returning tag"
            conn.execute(ins, (1, "a"))
            assert conn.execute(ret, (2, "b")).fetchall() == [("b",)]
            wait_applied(proxy)
            assert admin.post("/api/flip", json={"primary": "new"}).status_code == 200
            cur = conn.execute(ins, (3, "c"))
            assert cur.description is None and cur.rowcount == 1
            cur = conn.execute(ret, (4, "d"))
            assert cur.fetchall() == [("d",)] and [d.name for d in cur.description or []] == ["tag"]
        status = wait_applied(proxy)
        assert rows(fresh.old, "tags") == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
        assert_same(fresh, "tags")
        assert all(m["diverged"] == m["failed"] == 0 for m in status["mirrors"]), status["recent"]
    finally:
        proxy.stop()


def test_refused_statement_before_flush_keeps_the_tap_in_step(fresh: TwoClusters) -> None:
    """mirror.unsafe = "reject" for a request ending in Flush: Postgres skips what follows up to
    Sync; so must the tap (same root cause as the first test)."""
    proxy = mirror_proxy(fresh, {"unsafe": "reject"})
    try:
        with Raw(proxy.port) as raw:
            raw.startup()
            raw.send(Parse("", "with x as (insert into tags values (9, 'cte') returning *) select 1").encode() + FLUSH)
            assert codes(raw.until("E")) == ["E"]
            raw.send(bind() + execute() + SYNC)
            assert codes(raw.until("Z")) == ["Z"]
            raw.send(Query("insert into tags values (1, 'after')").encode())
            got = codes(raw.until("Z"))
            assert got == ["C", "Z"], got
    finally:
        proxy.stop()


def test_result_formats_for_a_write_without_returning(fresh: TwoClusters) -> None:
    """A Bind listing several result formats for a statement that returns no columns is accepted
    by Postgres (the formats are ignored without a result); with the image column appended the
    count no longer fits and the Bind fails."""
    proxy = mirror_proxy(fresh)
    try:
        data = Parse("", "insert into tags values (1, 'f')").encode() + bind("", "", (), (1, 1)) + execute() + SYNC
        direct = _exchange(fresh.new.port, Query("begin").encode() + data + Query("rollback").encode(), 3)
        assert codes(direct)[2:5] == ["1", "2", "C"]
        through = _exchange(proxy.port, data, 1)
        assert codes(through) == ["1", "2", "C", "Z"], through
    finally:
        proxy.stop()
