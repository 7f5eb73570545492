"""Read routing between two real clusters: who serves what, and that the application cannot tell.

``SELECT inet_server_port()`` names the backend that served a read. Both clusters hold the same
schema and data (tests/integration/conftest.py ROUTING_SCHEMA); "old" is the primary.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from psycopg import generators, waiting
from psycopg.pq import TransactionStatus as TS

from proxy.localpg import LocalCluster, free_port
from proxy.routing import RoutingStats
from tests.integration.conftest import ROUTING_SCHEMA, TwoClusters, routed_config
from tests.support.proxy import ProxyThread

pytestmark = pytest.mark.timeout(60)

CLIENT_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"PGCONNECT_TIMEOUT": "10"}
PORT = "select inet_server_port()"
HALF = {"old": 50, "new": 50}
ALL_NEW = {"old": 0, "new": 100}


def uid(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def stats(proxy: ProxyThread) -> RoutingStats:
    assert proxy.server is not None
    return proxy.server.ctx.stats


def on_both(clusters: TwoClusters, sql: str) -> None:
    for cluster in (clusters.old, clusters.new):
        cluster.psql(sql)


def rows(cluster: LocalCluster, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def ports_of(
    conn: psycopg.Connection[Any], n: int, sql: str = PORT, params: Any = None, binary: bool = False
) -> list[int]:
    """Run ``sql`` n times (simple protocol; extended with params or binary) -> who served each
    (the last column: inet_server_port())."""
    cur = conn.cursor(binary=binary)
    return [cur.execute(sql, params).fetchone()[-1] for _ in range(n)]  # type: ignore[index]


@pytest.fixture(scope="module")
def half(two_clusters: TwoClusters) -> Iterator[ProxyThread]:
    """A 50/50 proxy shared by the module (tests that count stats start their own)."""
    with ProxyThread(routed_config(two_clusters.old, two_clusters.new, reads=HALF)) as running:
        yield running


@pytest.fixture
def scratch(two_clusters: TwoClusters) -> Iterator[Callable[[str], str]]:
    """``scratch("(k int)")``: a uniquely named table created on BOTH clusters (so a write routed to
    the wrong one would succeed there, visibly), dropped afterwards."""
    names: list[str] = []

    def make(columns: str) -> str:
        name = uid("s")
        on_both(two_clusters, f"create table {name} {columns}")
        names.append(name)
        return name

    yield make
    if names:
        on_both(two_clusters, "".join(f"drop table if exists {n} cascade;" for n in names))


# =========================================================================================
# Weights, rules, hints, stickiness
# =========================================================================================


@pytest.mark.parametrize(("weights", "served_by"), [({"old": 100, "new": 0}, "old"), (ALL_NEW, "new")])
def test_exact_weights(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters, weights: dict[str, int], served_by: str
) -> None:
    # {old: 100, new: 0} alone would not split reads (a plain relay); a rule keeps it routed.
    proxy = routed_proxy(reads=weights, rules=[{"name": "never", "users": ["nobody"], "reads": {"new": 1}}])
    port = {"old": two_clusters.old.port, "new": two_clusters.new.port}[served_by]
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        simple = ports_of(conn, 200)
        extended = ports_of(conn, 100, "select inet_server_port() + %s", (0,)) + ports_of(conn, 100, binary=True)
    assert set(simple) == set(extended) == {port}
    assert stats(proxy).decisions == Counter({(served_by, "default"): 400})


def test_half_and_half(routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters) -> None:
    proxy = routed_proxy(reads=HALF)
    old, new = two_clusters.old.port, two_clusters.new.port
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        simple = ports_of(conn, 200)
        extended = ports_of(conn, 200, "select inet_server_port() + %s", (0,))
    for served in (simple, extended):
        assert set(served) == {old, new}
        assert 0.30 <= served.count(new) / len(served) <= 0.70, Counter(served)
    share = (simple + extended).count(new) / 400
    assert 0.35 <= share <= 0.65, share
    decisions = stats(proxy).decisions
    assert decisions[("new", "default")] == (simple + extended).count(new)
    assert decisions[("old", "default")] == (simple + extended).count(old)


def test_half_and_half_with_one_read_per_session(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters
) -> None:
    """The first read of a session opens its backend: it must still go where it was drawn."""
    proxy = routed_proxy(reads=HALF)
    served = []
    for _ in range(150):
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            served += ports_of(conn, 1)
    share = served.count(two_clusters.new.port) / len(served)
    assert 0.33 <= share <= 0.67, share
    decisions = stats(proxy).decisions
    assert decisions[("new", "default")] + decisions[("old", "default")] == 150  # one decision per read


def test_rules_and_hints(routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters) -> None:
    reporter = uid("reporter")
    on_both(two_clusters, f"create role {reporter} login; grant select on items, cities to {reporter}")
    try:
        proxy = routed_proxy(
            reads={"old": 100},
            rules=[
                {"name": "cities", "tables": ["cities"], "reads": {"new": 100}},
                {"name": "reporter", "users": [reporter], "reads": {"new": 100}},
                # More specific than "reporter" (two kinds of criteria): wins for its reads.
                {"name": "reporter-items", "users": [reporter], "tables": ["items"], "reads": {"old": 100}},
                {"name": "analytics", "application_names": ["analytics"], "reads": {"new": 100}},
            ],
        )
        old, new = two_clusters.old.port, two_clusters.new.port

        def served(conn: psycopg.Connection[Any], sql: str, binary: bool = False) -> int:
            return conn.cursor(binary=binary).execute(sql).fetchone()[0]  # type: ignore[index]

        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for binary in (False, True):
                assert served(conn, "select inet_server_port() from cities limit 1", binary) == new
                assert served(conn, "select inet_server_port() from public.cities limit 1", binary) == new
                assert (
                    served(conn, "select inet_server_port() from items join cities using (id) limit 1", binary) == old
                )
                assert served(conn, "select inet_server_port() from items limit 1", binary) == old
                assert served(conn, "select inet_server_port()", binary) == old  # no table: the tables rule is out
                # The hint picks the backend of a read, whatever the rules say ...
                assert (
                    served(conn, "/* pgshift:route=new */ select inet_server_port() from items limit 1", binary) == new
                )
                assert served(conn, "select inet_server_port() -- pgshift:route=new", binary) == new
                # ... an unknown name is ignored, and what is not a safe read never follows one.
                assert served(conn, "/* pgshift:route=nosuch */ select inet_server_port()", binary) == old
                assert served(conn, "/* pgshift:route=new */ select inet_server_port(), random()", binary) == old
        with psycopg.connect(proxy.dsn(user=reporter), autocommit=True) as conn:
            assert served(conn, "select inet_server_port()") == new  # users rule
            assert served(conn, "select inet_server_port() from items limit 1") == old  # users+tables rule
            assert served(conn, "select inet_server_port() from cities limit 1") == new
        with psycopg.connect(proxy.dsn(application_name="analytics"), autocommit=True) as conn:
            assert served(conn, "select inet_server_port() from items limit 1") == new
        with psycopg.connect(proxy.dsn(application_name="other"), autocommit=True) as conn:
            assert served(conn, "select inet_server_port() from items limit 1") == old
        decisions = stats(proxy).decisions
        assert decisions[("new", "hint")] == 4
        assert decisions[("new", "rule")] == 4 + 2 + 1
        assert decisions[("old", "rule")] == 1
        assert decisions[("old", "not_a_read")] == 2
    finally:
        on_both(two_clusters, f"drop owned by {reporter}; drop role {reporter}")


@pytest.mark.parametrize("where", ["default", "rule"])
def test_sticky_session(routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters, where: str) -> None:
    if where == "default":
        proxy = routed_proxy(reads=HALF, sticky="session")
        sql = PORT
    else:
        proxy = routed_proxy(reads={"old": 100}, rules=[{"tables": ["cities"], "reads": HALF, "sticky": "session"}])
        sql = "select inet_server_port() from cities limit 1"
    seen = set()
    for _ in range(16):
        with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
            served = set(ports_of(conn, 15, sql)) | set(ports_of(conn, 5, sql, binary=True))
            assert len(served) == 1, served  # one backend for the whole session
            seen |= served
            if where == "rule":  # reads outside the sticky rule are not affected by it
                assert set(ports_of(conn, 3)) == {two_clusters.old.port}
    assert seen == {two_clusters.old.port, two_clusters.new.port}  # drawn by weight per session
    decisions = stats(proxy).decisions
    assert sum(n for (_, reason), n in decisions.items() if reason == "sticky") == 16 * 19


# =========================================================================================
# What never leaves the primary
# =========================================================================================


def test_writes_ddl_locking_and_volatile_stay_on_primary(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters, scratch: Callable[[str], str]
) -> None:
    table = scratch("(k int)")
    seq, func, ddl, into = uid("seq"), uid("f"), uid("ddl"), uid("into")
    on_both(two_clusters, f"create sequence {seq}; create function {func}() returns int language sql as 'select 7'")
    proxy = routed_proxy(reads=ALL_NEW)
    old, new = two_clusters.old.port, two_clusters.new.port
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for binary in (False, True):
                cur = conn.cursor(binary=binary)
                base = 100 if binary else 0

                def port(sql: str, cur: psycopg.Cursor[Any] = cur) -> int:
                    return cur.execute(sql).fetchone()[-1]  # type: ignore[index]

                assert port(PORT) == new  # reads do go to "new" through this proxy
                cur.execute(f"insert into {table} values ({base + 1}), ({base + 2}), ({base + 3})")
                cur.execute(f"update {table} set k = k + 10 where k = {base + 3}")
                cur.execute(f"delete from {table} where k = {base + 2}")
                cur.execute(f"/* pgshift:route=new */ insert into {table} values ({base + 5})")
                assert port(f"select inet_server_port() from {table} limit 1 for update") == old
                assert port(f"select inet_server_port() from {table} limit 1 for share") == old
                assert port(f"select nextval('{seq}'), inet_server_port()") == old
                assert port("select random(), inet_server_port()") == old
                assert port("select gen_random_uuid(), inet_server_port()") == old
                assert port("select clock_timestamp(), inet_server_port()") == old
                assert port(f"select {func}(), inet_server_port()") == old  # a volatile user function
                assert port(f"with i as (insert into {table} values ({base + 4}) returning k) "
                            "select k, inet_server_port() from i") == old  # fmt: skip
                assert port("select pg_backend_pid(), inet_server_port()") == old  # answered per server
                with conn.transaction():
                    assert port("select 1, inet_server_port()") == old
                # A read-only transaction may be served by a read backend, but as a whole.
                cur.execute("begin read only")
                assert len({port(PORT), port("select 1, inet_server_port()"), port(PORT)}) == 1
                cur.execute("commit")
                assert port(PORT) == new
            conn.execute(f"create table {ddl} (a int)")
            conn.execute(f"select 1 as a into {into}")
            with conn.cursor().copy(f"copy {table} from stdin") as copy:
                copy.write_row((1000,))
        old_rows = sorted(r[0] for r in rows(two_clusters.old, f"select k from {table}"))
        assert old_rows == [1, 4, 5, 13, 101, 104, 105, 113, 1000]
        assert rows(two_clusters.new, f"select count(*) from {table}") == [(0,)]
        assert rows(two_clusters.old, f"select last_value, is_called from {seq}") == [(2, True)]
        assert rows(two_clusters.new, f"select last_value, is_called from {seq}") == [(1, False)]
        where = f"table_name in ('{ddl}', '{into}')"
        assert rows(two_clusters.old, f"select count(*) from information_schema.tables where {where}") == [(2,)]
        assert rows(two_clusters.new, f"select count(*) from information_schema.tables where {where}") == [(0,)]
    finally:
        on_both(two_clusters, f"drop sequence {seq}; drop function {func}(); drop table if exists {ddl}, {into}")


def test_user_functions_routed_by_volatility(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters
) -> None:
    """A function the analyzer does not know is judged by the primary's pg_proc: the first call
    runs on the primary (which is asked alongside), later ones are routed if it is not volatile."""
    stable, volatile, mixed = uid("stable"), uid("volatile"), uid("mixed")
    on_both(
        two_clusters,
        f"create function {stable}(int) returns text stable language sql as 'select name from items where id = $1';"
        f"create function {volatile}(int) returns int language sql as 'select $1';"
        f"create function {mixed}(int) returns int immutable language sql as 'select $1';"
        f"create function {mixed}(text) returns text language sql as 'select $1';",
    )
    proxy = routed_proxy(reads=ALL_NEW)
    old, new = two_clusters.old.port, two_clusters.new.port
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
            served = [conn.execute(f"select {stable}(%s), inet_server_port()", (i,)).fetchone() for i in (1, 2, 3)]
            assert served == [("item 1", old), ("item 2", new), ("item 3", new)]
            assert ports_of(conn, 3, f"select {volatile}(1), inet_server_port()") == [old] * 3
            # One volatile overload is enough: which one runs depends on the arguments.
            assert ports_of(conn, 3, f"select {mixed}(1), inet_server_port()") == [old] * 3
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:  # the verdict is shared by sessions
            assert conn.execute(f"select {stable}(4), inet_server_port()").fetchone() == ("item 4", new)
    finally:
        on_both(two_clusters, f"drop function {stable}(int), {volatile}(int), {mixed}(int), {mixed}(text)")


@pytest.mark.timeout(20)
def test_pipeline_write_after_a_flushed_read(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters, scratch: Callable[[str], str]
) -> None:
    """psycopg sends Flush when a result is fetched inside a pipeline: the read before it and the
    write after it share one implicit transaction, so the read may not go to "new" (the write
    would follow it there). A Flush alone after Sync, on the other hand, ties nothing."""
    table = scratch("(k int)")
    proxy = routed_proxy(reads=ALL_NEW)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(3):
            with conn.pipeline():
                read = conn.execute("select inet_server_port(), %s::int", (i,))
                assert read.fetchone() == (two_clusters.old.port, i)
                conn.execute(f"insert into {table} values (%s)", (i,))
            # Routing resumes right after the pipeline.
            assert ports_of(conn, 3, "select inet_server_port() + %s", (0,)) == [two_clusters.new.port] * 3
    assert rows(two_clusters.old, f"select array_agg(k order by k) from {table}") == [([0, 1, 2],)]
    assert rows(two_clusters.new, f"select count(*) from {table}") == [(0,)]


# =========================================================================================
# Transactions are never split (property test)
# =========================================================================================

Op = tuple[str, ...]

_SIMPLE_OPS: list[Op] = [
    ("begin",), ("begin",), ("commit",), ("rollback",), ("read",), ("read",), ("read",), ("write",), ("write",),
    ("write",), ("error",), ("savepoint", "a"), ("savepoint", "b"), ("rollback_to", "a"), ("rollback_to", "b"),
    ("release", "a"),
]  # fmt: skip
simple_op = st.sampled_from(_SIMPLE_OPS)
# ("read", "fetch"): a read whose result is fetched at once (psycopg sends Flush, not Sync).
pipeline_block = st.lists(
    st.one_of(simple_op, simple_op, simple_op, st.sampled_from([("sync",), ("fetch",), ("read", "fetch")])),
    min_size=1,
    max_size=8,
).map(
    lambda items: (
        "pipeline",
        *[text for i in items for text in (["read", "fetch"] if i == ("read", "fetch") else [":".join(i)])],
    )
)
sequences = {
    "simple": st.lists(st.one_of(simple_op, simple_op, pipeline_block), min_size=1, max_size=18),
    "extended": st.lists(st.one_of(simple_op, simple_op, pipeline_block), min_size=1, max_size=18),
    # psycopg prepares every statement (named Parse) and, after a ROLLBACK, sends DEALLOCATE ALL on its own
    # schedule; inside a pipeline that would add statements the model cannot place, so no pipelines here.
    "prepared": st.lists(simple_op, min_size=1, max_size=18),
}


@dataclass
class _Tx:
    pending: list[int]
    failed: bool = False
    savepoints: list[tuple[str, int]] = field(default_factory=list)


class TxModel:
    """What Postgres does with a sequence of statements on one autocommit connection.

    Outside BEGIN each Sync (every statement outside a pipeline) ends an implicit transaction: the
    statements of one pipeline segment commit together at its Sync, or not at all after an error,
    and the messages after an error are skipped until Sync (protocol-flow.html, "Pipelining").
    """

    def __init__(self) -> None:
        self.committed: list[int] = []
        self.tx: _Tx | None = None
        self.implicit: list[int] = []
        self.skipping = False

    @property
    def status(self) -> str:
        if self.tx is None:
            return "IDLE"
        return "INERROR" if self.tx.failed else "INTRANS"

    @property
    def in_transaction(self) -> bool:
        return self.tx is not None

    def sync(self) -> None:
        self.skipping = False
        if self.tx is None:
            self.committed += self.implicit
        self.implicit = []

    def _error(self, sqlstate: str) -> str:
        if self.tx is not None:
            self.tx.failed = True
        else:
            self.implicit = []
        self.skipping = True
        return sqlstate

    def step(self, op: Op, value: int) -> str:
        """The outcome: "ok", the SQLSTATE of the error, or "skipped" (after an error, until Sync)."""
        if self.skipping:
            return "skipped"
        kind, tx = op[0], self.tx
        if tx is not None and tx.failed and kind not in ("commit", "rollback", "rollback_to"):
            return self._error("25P02")
        if kind == "begin":
            if tx is None:  # an implicit transaction in progress becomes the explicit one
                self.tx, self.implicit = _Tx(self.implicit), []
        elif kind == "commit":
            if tx is None:
                self.committed += self.implicit
                self.implicit = []
            else:
                if not tx.failed:
                    self.committed += tx.pending
                self.tx = None
        elif kind == "rollback":
            self.implicit = []
            self.tx = None
        elif kind in ("savepoint", "release", "rollback_to"):
            if tx is None:
                return self._error("25P01")
            name = op[1]
            if kind == "savepoint":
                tx.savepoints.append((name, len(tx.pending)))
                return "ok"
            found = [i for i, (n, _) in enumerate(tx.savepoints) if n == name]
            if not found:
                return self._error("3B001")
            at = found[-1]
            if kind == "release":
                del tx.savepoints[at:]
            else:
                del tx.pending[tx.savepoints[at][1] :]
                del tx.savepoints[at + 1 :]
                tx.failed = False
        elif kind == "write":
            (tx.pending if tx is not None else self.implicit).append(value)
        elif kind == "error":
            return self._error("22012")
        return "ok"


def _sql(op: Op, table: str, value: int) -> str:
    kind = op[0]
    return {
        "begin": "begin",
        "commit": "commit",
        "rollback": "rollback",
        "savepoint": f"savepoint {op[-1]}",
        "rollback_to": f"rollback to savepoint {op[-1]}",
        "release": f"release savepoint {op[-1]}",
        "read": PORT,
        "write": f"insert into {table} values ({value})",
        "error": "select 1/0",
    }[kind]


@dataclass
class TxRun:
    observed: list[Any] = field(default_factory=list)  # outcomes and transaction states, per step
    reads: list[tuple[int, bool, bool, int]] = field(default_factory=list)  # (segment, in tx, segment writes, port)


def run_tx_sequence(dsn: str, table: str, sequence: list[Any], mode: str, model: TxModel | None = None) -> TxRun:
    """Run the sequence on one connection; with ``model``, also record what the model predicts."""
    run = TxRun()
    binary = mode != "simple"
    value = 0
    segment = 0
    # Closed, not left by `with` (which would COMMIT an open transaction): the server rolls it back.
    conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=0 if mode == "prepared" else None)
    with contextlib.closing(conn):
        for item in sequence:
            if item[0] != "pipeline":
                op: Op = item
                value += 1
                cur = conn.cursor(binary=binary)
                try:
                    cur.execute(_sql(op, table, value))
                    outcome = "ok"
                except psycopg.Error as exc:
                    outcome = exc.sqlstate or type(exc).__name__
                in_tx = model.in_transaction if model else False
                expected = model.step(op, value) if model else None
                if model:
                    model.sync()
                if op[0] == "read" and outcome == "ok":
                    run.reads.append((segment, in_tx, False, cur.fetchone()[0]))  # type: ignore[index]
                segment += 1
                run.observed.append((op, outcome, conn.info.transaction_status.name, expected, model and model.status))
                continue
            # A pipeline block: statements, Syncs and fetches (a fetch sends Flush).
            block: list[tuple[Op, int, psycopg.Cursor[Any], bool, str | None, int]] = []
            segment_ops: dict[int, set[str]] = {}
            try:
                with conn.pipeline() as pipeline:
                    for text in item[1:]:
                        op = tuple(text.split(":"))
                        if op[0] == "sync":
                            with contextlib.suppress(psycopg.Error):
                                pipeline.sync()
                            if model:
                                model.sync()
                            segment += 1
                            continue
                        if op[0] == "fetch":
                            last_read = next((b[2] for b in reversed(block) if b[0][0] == "read"), None)
                            if last_read is not None:
                                with contextlib.suppress(psycopg.Error):
                                    last_read.fetchone()
                            continue
                        value += 1
                        cur = conn.cursor(binary=binary)
                        in_tx = model.in_transaction if model else False
                        expected = model.step(op, value) if model else None
                        segment_ops.setdefault(segment, set()).add(op[0])
                        with contextlib.suppress(psycopg.Error):  # or an earlier statement's error, surfacing here
                            cur.execute(_sql(op, table, value))
                        block.append((op, value, cur, in_tx, expected, segment))
            except psycopg.Error:
                pass
            if model:
                model.sync()
            segment += 1
            for op, _value, cur, in_tx, expected, seg in block:
                ok = cur.pgresult is not None
                if op[0] == "read" and ok:
                    cur.scroll(0, mode="absolute")
                    writes = bool(segment_ops[seg] - {"read", "error"})
                    run.reads.append((seg, in_tx, writes, cur.fetchone()[0]))  # type: ignore[index]
                run.observed.append((op, ok, expected == "ok" if model else None))
            run.observed.append(("after pipeline", conn.info.transaction_status.name, model and model.status))
    return run


@contextlib.contextmanager
def watchdog(proxy: ProxyThread, seconds: float) -> Iterator[threading.Event]:
    """Ends every session of ``proxy`` if the block takes longer than ``seconds``: a client that
    waits forever for an answer fails instead (with an error from the proxy)."""
    fired = threading.Event()

    def close_all() -> None:
        assert proxy.server is not None
        for session in list(proxy.server.registry):
            session.force_close()

    def fire() -> None:
        fired.set()
        proxy.call(close_all)

    timer = threading.Timer(seconds, fire)
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


@pytest.mark.parametrize("mode", list(sequences))
def test_transactions_never_split(half: ProxyThread, two_clusters: TwoClusters, mode: str) -> None:
    old, new = two_clusters.old, two_clusters.new
    table = uid("tx")
    on_both(two_clusters, f"create table {table} (k int); create table {table}_direct (k int)")
    served: Counter[int] = Counter()

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        # No shrinking: a failure may be a hang (5 s per attempt); the sequences are short anyway.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(sequence=sequences[mode])
    def check(sequence: list[Any]) -> None:
        on_both(two_clusters, f"truncate {table}, {table}_direct")
        model = TxModel()
        with watchdog(half, 5) as fired:
            try:
                through = run_tx_sequence(half.dsn(), table, sequence, mode, model)
            except psycopg.Error as exc:
                if fired.is_set():
                    raise AssertionError(f"no answer through the proxy within 5 s: {sequence}") from exc
                raise
        direct = run_tx_sequence(old.dsn(), f"{table}_direct", sequence, mode)
        # The model is Postgres itself, run directly ...
        for step, seen in zip(direct.observed, through.observed, strict=True):
            if step[0] == "after pipeline":
                assert step[1] == seen[2], f"model disagrees with postgres: {seen}"
            elif len(step) == 5:
                assert (step[1], step[2]) == (seen[3], seen[4]), f"model disagrees with postgres: {seen}"
            else:
                assert step[1] == seen[2], f"model disagrees with postgres: {seen}"
        # ... and through the proxy every step has the same outcome and transaction state.
        for step in through.observed:
            if step[0] == "after pipeline":
                assert step[1] == step[2], step
            elif len(step) == 5:
                assert (step[1], step[2]) == (step[3], step[4]), step
            else:
                assert step[1] == step[2], step
        # No transaction is split: inside one, every read is the primary's; in a pipeline segment
        # that writes (its implicit transaction), too; and one segment is served by one backend.
        for _seg, in_tx, writes, port in through.reads:
            if in_tx or writes:
                assert port == old.port, (through.reads, sequence)
        by_segment: dict[int, set[int]] = {}
        for seg, _, _, port in through.reads:
            by_segment.setdefault(seg, set()).add(port)
            served[port] += 1
        assert all(len(ports) == 1 for ports in by_segment.values()), by_segment
        # Committed writes only, on the primary only.
        assert sorted(r[0] for r in rows(old, f"select k from {table}")) == sorted(model.committed)
        assert sorted(r[0] for r in rows(old, f"select k from {table}_direct")) == sorted(model.committed)
        assert rows(new, f"select count(*) from {table}") == [(0,)]

    try:
        check()
    finally:
        on_both(two_clusters, f"drop table {table}, {table}_direct")
    # No assertion that some reads reached "new": random sequences may keep every read inside a
    # transaction. That reads are spread is proven by the weight tests above; this test proves
    # nothing is split.


# =========================================================================================
# Session pins
# =========================================================================================

PINS = {
    "temp_table": ["create temp table pin_tmp (a int)"],
    "listen": ["listen pin_channel"],
    "advisory_lock": ["select pg_advisory_lock(4242)"],
    "prepare": ["prepare pin_q as select 1"],
    "cursor_with_hold": ["declare pin_c cursor with hold for select 1"],
    "set_config": ["select set_config('search_path', 'public', false)"],
    # A setting made inside a transaction may yet be rolled back: it cannot be replayed elsewhere.
    "unknown_session_state": ["begin", "set statement_timeout = '5min'", "commit"],
}


@pytest.mark.parametrize("binary", [False, True], ids=["simple", "extended"])
@pytest.mark.parametrize("cause", list(PINS))
def test_session_pins(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters, cause: str, binary: bool
) -> None:
    proxy = routed_proxy(reads=ALL_NEW)
    old, new = two_clusters.old.port, two_clusters.new.port
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        psycopg.connect(proxy.dsn(), autocommit=True) as other,
    ):
        assert ports_of(conn, 3, binary=binary) == [new] * 3
        for statement in PINS[cause]:
            conn.cursor(binary=binary).execute(statement)
        assert set(ports_of(conn, 30)) | set(ports_of(conn, 30, binary=True)) == {old}
        for i in range(1, 6):
            assert conn.execute("select name, inet_server_port() from items where id = %s", (i,)).fetchone() == (
                f"item {i}",
                old,
            )
        assert stats(proxy).pins == Counter({cause: 1})
        assert ports_of(other, 5) == [new] * 5  # a pin is per session


# =========================================================================================
# Session settings and what the client sees of the servers
# =========================================================================================


def test_session_settings_replayed(routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters) -> None:
    key = uid("set")
    role = uid("role")
    on_both(
        two_clusters,
        f"create table marker_{key} (v text); insert into marker_{key} values ('public');"
        f"create schema sa_{key}; create table sa_{key}.marker_{key} (v text); insert into sa_{key}.marker_{key} "
        f"values ('a'); create schema sb_{key}; create table sb_{key}.marker_{key} (v text); insert into "
        f"sb_{key}.marker_{key} values ('b'); create role {role}; grant usage on schema sa_{key}, sb_{key} to {role};"
        f"grant select on all tables in schema public, sa_{key}, sb_{key} to {role};",
    )
    proxy = routed_proxy(reads=HALF)
    probe = (
        "select inet_server_port(), current_setting('search_path'), current_setting('TimeZone'), "
        f"current_setting('application_name'), current_user, (select v from marker_{key}), "
        "to_char(timestamptz '2024-01-01 12:00:00+00', 'HH24:MI')"
    )
    direct_version = rows(two_clusters.old, "show server_version")[0][0]
    default_tz = rows(two_clusters.old, "show TimeZone")[0][0]
    noon = rows(two_clusters.old, "select to_char(timestamptz '2024-01-01 12:00:00+00', 'HH24:MI')")[0][0]
    seen_ports: set[int] = set()
    try:
        with psycopg.connect(proxy.dsn(application_name=key), autocommit=True) as conn:
            pid = conn.info.backend_pid
            sa, sb, kat, app = f"sa_{key}, public", f"sb_{key}", "Asia/Kathmandu", "replayed"
            steps: list[tuple[str, tuple[Any, ...]]] = [
                ("select 1", ('"$user", public', default_tz, key, "postgres", "public", noon)),
                (f"set search_path = sa_{key}, public", (sa, default_tz, key, "postgres", "a", noon)),
                (f"set TimeZone = '{kat}'", (sa, kat, key, "postgres", "a", "17:45")),
                (f"set application_name = '{app}'", (sa, kat, app, "postgres", "a", "17:45")),
                (f"set role {role}", (sa, kat, app, role, "a", "17:45")),
                (f"set search_path = sb_{key}", (sb, kat, app, role, "b", "17:45")),
                ("reset TimeZone", (sb, default_tz, app, role, "b", noon)),
                ("reset role", (sb, default_tz, app, "postgres", "b", noon)),
                ("reset all", ('"$user", public', default_tz, key, "postgres", "public", noon)),
            ]
            for statement, expected in steps:
                conn.execute(statement)
                for binary in (False, True):
                    cur = conn.cursor(binary=binary)
                    for _ in range(20):
                        port, *values = cur.execute(probe).fetchone()  # type: ignore[misc]
                        assert tuple(values) == expected, (statement, port)
                        seen_ports.add(port)
                    assert cur.execute("show search_path").fetchone() == (expected[0],)
                    assert cur.execute("show TimeZone").fetchone() == (expected[1],)
                # The client sees one server, the primary: its parameters, its process id.
                assert conn.info.parameter_status("TimeZone") == expected[1]
                assert conn.info.parameter_status("application_name") == expected[2]
                assert conn.info.parameter_status("server_version") == direct_version
                assert conn.info.backend_pid == pid == conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            on_old = rows(two_clusters.old, f"select count(*) from pg_stat_activity where pid = {pid}")
            on_new = rows(two_clusters.new, f"select count(*) from pg_stat_activity where pid = {pid}")
            assert (on_old, on_new) == ([(1,)], [(0,)])
    finally:
        on_both(
            two_clusters,
            f"drop table marker_{key}; drop schema sa_{key}, sb_{key} cascade; drop owned by {role}; drop role {role}",
        )
    assert seen_ports == {two_clusters.old.port, two_clusters.new.port}
    assert stats(proxy).replays["new"] > 0
    assert not stats(proxy).failovers  # every read on "new" succeeded there: nothing was masked
    assert not stats(proxy).pins


def test_client_sees_only_the_primary_parameter_status(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters
) -> None:
    """A replayed RESET on "new" reports new's own default; the client must keep the primary's."""
    role = uid("tz")
    on_both(two_clusters, f"create role {role} login")
    two_clusters.new.psql(f"alter role {role} set TimeZone = 'Asia/Tokyo'")
    proxy = routed_proxy(reads=ALL_NEW)
    default_tz = rows(two_clusters.old, "show TimeZone")[0][0]
    assert default_tz != "Asia/Tokyo"
    try:
        with psycopg.connect(proxy.dsn(user=role), autocommit=True) as conn:
            assert conn.info.parameter_status("TimeZone") == default_tz
            assert ports_of(conn, 1) == [two_clusters.new.port]
            conn.execute("set TimeZone = 'Europe/Paris'")
            assert ports_of(conn, 2) == [two_clusters.new.port] * 2
            assert conn.info.parameter_status("TimeZone") == "Europe/Paris"
            conn.execute("reset TimeZone")
            assert conn.info.parameter_status("TimeZone") == default_tz
            assert ports_of(conn, 2) == [two_clusters.new.port] * 2  # RESET replayed on "new"
            assert conn.info.parameter_status("TimeZone") == default_tz
        assert stats(proxy).replays["new"] == 2
    finally:
        on_both(two_clusters, f"drop role {role}")


# =========================================================================================
# Prepared statements across backends
# =========================================================================================


def test_psycopg_prepared_statements_across_backends(half: ProxyThread, two_clusters: TwoClusters) -> None:
    before = stats(half).replays.copy()
    served = Counter()
    with psycopg.connect(half.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for i in range(1, 201):
            name, price, port = conn.execute(
                "select name, price, inet_server_port() from items where id = %s", (i,)
            ).fetchone()  # type: ignore[misc]
            assert (name, price) == (f"item {i}", i * 1.5)
            served[port] += 1
        # Many distinct statements with a small cache: psycopg closes the evicted ones (protocol Close).
        conn.prepared_max = 2
        for i in range(60):
            sql = f"select name, inet_server_port(), {i % 6} as v from items where id = %s"
            name, port, v = conn.execute(sql, (i + 1,)).fetchone()  # type: ignore[misc]
            assert (name, v) == (f"item {i + 1}", i % 6)
            served[port] += 1
    assert set(served) == {two_clusters.old.port, two_clusters.new.port}
    replays = stats(half).replays - before
    assert replays["old"] + replays["new"] > 0  # statements were re-Parsed where they were missing


def libpq_results(pgconn: psycopg.pq.abc.PGconn) -> list[psycopg.pq.abc.PGresult]:
    """The results of what was just sent with pgconn.send_*(): Python-level waits (libpq's
    blocking calls would hold the GIL that the in-process proxy thread needs)."""
    return waiting.wait(generators.execute(pgconn), pgconn.socket, interval=0.1)  # type: ignore[no-any-return]


def test_prepared_statement_used_in_a_failed_transaction(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters
) -> None:
    """A statement prepared outside a transaction (Parse + Sync, as libpq's PQprepare sends it)
    and used inside a failed one fails the way it does directly (25P02), and works on the primary
    after the rollback. (libpq directly: psycopg would send DEALLOCATE ALL after a ROLLBACK,
    which pins the session.)"""
    proxy = routed_proxy(reads=ALL_NEW)
    old, new = str(two_clusters.old.port).encode(), str(two_clusters.new.port).encode()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pgconn = conn.pgconn

        def run(sql: bytes) -> psycopg.pq.abc.PGresult:
            pgconn.send_query(sql)
            return libpq_results(pgconn)[-1]

        def execute(key: int) -> tuple[str | None, bytes | None, bytes | None]:
            pgconn.send_query_prepared(b"s1", [str(key).encode()])
            (result,) = libpq_results(pgconn)
            if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
                return result.error_field(psycopg.pq.DiagnosticField.SQLSTATE).decode(), None, None  # type: ignore[union-attr]
            return None, result.get_value(0, 0), result.get_value(0, 1)

        pgconn.send_prepare(b"s1", b"select name, inet_server_port() from items where id = $1")
        assert libpq_results(pgconn)[0].status == psycopg.pq.ExecStatus.COMMAND_OK
        assert execute(1) == (None, b"item 1", new)
        for _ in range(2):
            run(b"begin")
            assert run(b"select 1 / 0").status == psycopg.pq.ExecStatus.FATAL_ERROR
            assert execute(2) == ("25P02", None, None)
            run(b"rollback")
            run(b"begin")
            assert execute(3) == (None, b"item 3", old)
            run(b"commit")
            assert execute(4) == (None, b"item 4", new)
    assert not stats(proxy).failovers


def test_libpq_statement_closed_and_prepared_again_under_the_same_name(
    half: ProxyThread, two_clusters: TwoClusters
) -> None:
    """The name comes back with other SQL: a backend that still has the old statement must drop it
    first (the proxy closes it there lazily), or it would answer with the old SQL's rows."""
    served: Counter[int] = Counter()
    cities = ["Lisbon", "Oslo", "Quito", "Hanoi", "Dakar"]
    rounds = [
        (b"select name, inet_server_port() from items where id = $1", lambda k: f"item {k}"),
        (b"select name || '!', inet_server_port() from cities where id = $1", lambda k: f"{cities[k - 1]}!"),
        (b"select upper(name), inet_server_port() from items where id = $1", lambda k: f"ITEM {k}"),
    ]
    with psycopg.connect(half.dsn(), autocommit=True) as conn:
        pgconn = conn.pgconn

        for sql, expected in rounds:
            pgconn.send_prepare(b"stmt", sql)
            (result,) = libpq_results(pgconn)
            assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
            for i in range(40):
                key = i % 5 + 1
                pgconn.send_query_prepared(b"stmt", [str(key).encode()])
                (result,) = libpq_results(pgconn)
                assert result.status == psycopg.pq.ExecStatus.TUPLES_OK, result.error_message
                assert result.get_value(0, 0) == expected(key).encode()
                served[int(result.get_value(0, 1) or b"0")] += 1
            pgconn.send_close_prepared(b"stmt")
            (result,) = libpq_results(pgconn)
            assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
    assert set(served) == {two_clusters.old.port, two_clusters.new.port}


async def test_asyncpg_prepared_statements_across_backends(half: ProxyThread, two_clusters: TwoClusters) -> None:
    served: Counter[int] = Counter()
    conn = await asyncpg.connect(half.dsn(), statement_cache_size=2)
    try:
        stmt = await conn.prepare("select name, inet_server_port() from items where id = $1")
        for i in range(1, 151):
            row = await stmt.fetchrow(i)
            assert row is not None and row[0] == f"item {i}"
            served[row[1]] += 1
        # Statement cache churn: asyncpg closes evicted statements and prepares new ones.
        for i in range(60):
            row = await conn.fetchrow(f"select name, inet_server_port(), {i % 5} as v from items where id = $1", i + 1)
            assert row is not None and (row[0], row[2]) == (f"item {i + 1}", i % 5)
            served[row[1]] += 1
        rows_ = await conn.fetch("select id from cities where id = any($1::int[]) order by id", [2, 4])
        assert [r[0] for r in rows_] == [2, 4]
    finally:
        await conn.close()
    assert set(served) == {two_clusters.old.port, two_clusters.new.port}


def test_pgbench_prepared_reads(routed_proxy: Callable[..., ProxyThread], tmp_path: Path) -> None:
    proxy = routed_proxy(reads=HALF)
    script = tmp_path / "reads.sql"
    script.write_text("\\set id random(1, 1000)\nselect name from items where id = :id;\n")
    run = subprocess.run(
        ["pgbench", "-n", "-M", "prepared", "-f", str(script), "-c", "4", "-j", "2", "-t", "150", "-d", proxy.dsn()],
        capture_output=True,
        text=True,
        env=CLIENT_ENV,
        timeout=60,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "number of transactions actually processed: 600/600" in run.stdout, output
    assert "number of failed transactions: 0" in run.stdout or "failed" not in run.stdout, output
    decisions = stats(proxy).decisions
    assert decisions[("old", "default")] > 100 and decisions[("new", "default")] > 100, decisions
    assert not stats(proxy).failovers


# =========================================================================================
# Read failover
# =========================================================================================


def test_failover_when_new_lacks_the_table(routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters) -> None:
    table = uid("only_old")
    two_clusters.old.psql(f"create table {table} (id int, v text); insert into {table} values (1, 'one'), (2, 'two')")
    proxy = routed_proxy(reads=ALL_NEW)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for binary in (False, True):
                cur = conn.cursor(binary=binary)
                assert cur.execute(f"select id, v, inet_server_port() from {table} order by id").fetchall() == [
                    (1, "one", two_clusters.old.port),
                    (2, "two", two_clusters.old.port),
                ]
            assert conn.execute(f"select v from {table} where id = %s", (2,)).fetchone() == ("two",)
            # An error the primary gives too reaches the client once, as it would directly.
            with pytest.raises(psycopg.errors.UndefinedColumn):
                conn.execute(f"select nosuch from {table}")
            assert conn.info.transaction_status == TS.IDLE
            assert ports_of(conn, 2) == [two_clusters.new.port] * 2  # "new" still serves what it can
    finally:
        two_clusters.old.psql(f"drop table {table}")
    assert stats(proxy).failovers == Counter({("new", "error"): 4})


def test_no_failover_once_rows_reached_the_client(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters
) -> None:
    """Data that fails only on "new": a small result is retried on the primary; a result that had
    to be released to the client before the error came is not (the error is the client's)."""
    small, big = uid("small"), uid("big")
    for table, n in ((small, 50), (big, 3000)):
        on_both(
            two_clusters,
            f"create table {table} (id int, pad text, x int); "
            f"insert into {table} select g, repeat('p', 300), 1 from generate_series(1, {n}) g",
        )
        two_clusters.new.psql(f"update {table} set x = 0 where id = {n}")
    proxy = routed_proxy(reads=ALL_NEW)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            got = conn.execute(f"select id, 1 / x, inet_server_port() from {small}").fetchall()
            assert len(got) == 50 and {r[2] for r in got} == {two_clusters.old.port}
            assert stats(proxy).failovers == Counter({("new", "error"): 1})
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute(f"select id, pad, 1 / x from {big}").fetchall()
            assert stats(proxy).failovers == Counter({("new", "error"): 1})
            assert conn.execute("select 'usable'").fetchone() == ("usable",)
    finally:
        on_both(two_clusters, f"drop table {small}, {big}")


def test_failover_when_new_is_unreachable(routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters) -> None:
    nowhere = f"postgresql://127.0.0.1:{free_port()}?connect_timeout=5"
    proxy = routed_proxy(backends=(two_clusters.old, nowhere), reads=ALL_NEW)
    for _ in range(2):
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert ports_of(conn, 5) == [two_clusters.old.port] * 5
            assert conn.execute("select count(*) from items").fetchone() == (1000,)
    assert stats(proxy).failovers[("new", "connect")] == 2  # tried once per session


@pytest.mark.timeout(90)
def test_failover_when_new_stops_and_comes_back(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters, make_cluster: Callable[..., LocalCluster]
) -> None:
    doomed = make_cluster("doomed")
    try:
        doomed.psql(ROUTING_SCHEMA)
        proxy = routed_proxy(backends=(two_clusters.old, doomed), reads=ALL_NEW)
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert ports_of(conn, 2) == [doomed.port] * 2
            conn.execute("begin")
            conn.execute("select 1")
            doomed.stop()  # its FATAL reaches the proxy while this session is idle, in a transaction
            time.sleep(0.3)
            assert ports_of(conn, 2) == [two_clusters.old.port] * 2
            conn.execute("commit")
            assert ports_of(conn, 3) == [two_clusters.old.port] * 3  # no error, ever
            assert conn.execute("select name from items where id = 7").fetchone() == ("item 7",)
            doomed.start()
            assert ports_of(conn, 2) == [two_clusters.old.port] * 2  # this session gave up on it
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert ports_of(conn, 2) == [doomed.port] * 2  # a new session uses it again
        assert stats(proxy).failovers[("new", "connect")] == 1
    finally:
        doomed.destroy()


@pytest.mark.timeout(30)
def test_failover_when_the_connection_is_lost_mid_read(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters, scratch: Callable[[str], str]
) -> None:
    table = scratch("(id int)")
    on_both(two_clusters, f"insert into {table} values (1), (2), (3)")
    proxy = routed_proxy(reads=ALL_NEW)
    result: list[Any] = []

    def read() -> None:
        try:
            with psycopg.connect(proxy.dsn(application_name=table), autocommit=True) as conn:
                result.append(conn.execute(f"select count(*), inet_server_port() from {table}").fetchone())
        except BaseException as exc:
            result.append(exc)

    with psycopg.connect(two_clusters.new.dsn()) as locker:
        locker.execute(f"lock table {table} in access exclusive mode")  # the read waits on "new"
        worker = threading.Thread(target=read)
        worker.start()
        try:
            waiting: list[tuple[Any, ...]] = []
            for _ in range(100):
                waiting = rows(
                    two_clusters.new,
                    f"select pid from pg_stat_activity where application_name = '{table}' and wait_event_type = 'Lock'",
                )
                if waiting:
                    break
                time.sleep(0.05)
            assert waiting, "the read never reached new"
            assert rows(two_clusters.new, f"select pg_terminate_backend({waiting[0][0]})") == [(True,)]
            worker.join(10)
        finally:
            locker.rollback()
            worker.join(10)
    assert result == [(3, two_clusters.old.port)]
    assert stats(proxy).failovers == Counter({("new", "connection lost"): 1})


def test_unsolicited_message_from_an_idle_read_backend(
    routed_proxy: Callable[..., ProxyThread], two_clusters: TwoClusters, scratch: Callable[[str], str]
) -> None:
    """ "new" ends the session's idle connection to it (FATAL) while a transaction runs on the
    primary: the client sees nothing of it, and the transaction stays whole."""
    table = scratch("(k int)")
    proxy = routed_proxy(reads=ALL_NEW)
    app = uid("app")
    with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as conn:
        assert ports_of(conn, 1) == [two_clusters.new.port]
        conn.execute("begin")
        conn.execute(f"insert into {table} values (1)")
        killed = rows(
            two_clusters.new, f"select pg_terminate_backend(pid) from pg_stat_activity where application_name = '{app}'"
        )
        assert killed == [(True,)]
        time.sleep(0.3)
        assert ports_of(conn, 3) == [two_clusters.old.port] * 3
        assert conn.execute(f"select count(*) from {table}").fetchone() == (1,)
        conn.execute("commit")
        assert ports_of(conn, 2) == [two_clusters.new.port] * 2  # reconnected for the next reads
    assert rows(two_clusters.old, f"select count(*) from {table}") == [(1,)]
    assert rows(two_clusters.new, f"select count(*) from {table}") == [(0,)]


async def test_asyncpg_reads_spread_and_errors_match(half: ProxyThread, two_clusters: TwoClusters) -> None:
    served: Counter[int] = Counter()
    conn = await asyncpg.connect(half.dsn())
    try:
        for i in range(1, 101):
            row = await conn.fetchrow("select name, inet_server_port() from items where id = $1", i)
            assert row is not None and row[0] == f"item {i}"
            served[row[1]] += 1
        for _ in range(5):  # an error the primary gives too: once, as directly
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetchval("select 1 / $1::int", 0)
            assert await conn.fetchval("select 2") == 2
    finally:
        await conn.close()
    assert set(served) == {two_clusters.old.port, two_clusters.new.port}
