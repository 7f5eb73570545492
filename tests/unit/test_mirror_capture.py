"""Capture's state machine and message edits, driven with hand-built protocol messages (no server)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from proxy.config import MirrorConfig
from proxy.errors import ProtocolViolation
from proxy.mirror import wireedit
from proxy.mirror.capture import Capture, Rejected
from proxy.mirror.manager import Policy
from proxy.mirror.model import ImageOp, Write, WriteKind
from proxy.mirror.plan import PlanCache, StatementPlan, rewrite_parse
from proxy.mirror.settings import SessionSettings, changes, from_startup
from proxy.wire.messages import Parse, Query


def msg(code: bytes, body: bytes) -> bytes:
    return code + struct.pack("!I", len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def row_desc(*names: str) -> bytes:
    fields = b"".join(cstr(n) + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0) for n in names)
    return msg(b"T", struct.pack("!h", len(names)) + fields)


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return msg(b"D", body)


def complete(tag: str) -> bytes:
    return msg(b"C", cstr(tag))


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


ERROR = msg(b"E", b"SERROR\x00C23505\x00Mduplicate\x00\x00")
PARSE_OK, BIND_OK = msg(b"1", b""), msg(b"2", b"")


def bind(stmt: str = "", params: tuple[bytes, ...] = (), result_formats: tuple[int, ...] = ()) -> bytes:
    body = cstr("") + cstr(stmt) + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", len(p)) + p
    body += struct.pack("!h", len(result_formats)) + b"".join(struct.pack("!h", f) for f in result_formats)
    return msg(b"B", body)


def execute(limit: int = 0) -> bytes:
    return msg(b"E", cstr("") + struct.pack("!i", limit))


SYNC = msg(b"S", b"")


class FakeManager:
    """The manager's surface capture uses: plans, config, policy, commits recorded."""

    def __init__(self, **config: Any) -> None:
        self.plans = PlanCache()
        self.config = MirrorConfig(**config)
        self.commits: list[tuple[tuple[tuple[str, str], ...], tuple[Write, ...]]] = []
        self.notes: list[tuple[str, StatementPlan, str]] = []
        self.wait: asyncio.Future[str | None] | None = None
        self.unrewritable: frozenset[str] = frozenset()
        self.forgotten = 0

    def policy(self, user: str, application_name: str, tables: tuple[str, ...] = ()) -> Policy:
        return Policy(self.config.mode, self.config.sync_timeout, self.config.unsafe)

    def rewritten_parse(self, raw: bytes, sql: str, codec: str) -> bytes:
        return rewrite_parse(raw, sql, encoding=codec)

    def rewritable(self, database: str, user: str) -> frozenset[str]:
        return self.unrewritable

    def forget_targets(self) -> None:
        self.forgotten += 1

    def commit(
        self, capture: Capture, settings: Any, writes: tuple[Write, ...], size: int
    ) -> asyncio.Future[str | None] | None:
        self.commits.append((settings, writes))
        return self.wait

    def note(self, capture: Capture, kind: str, plan: StatementPlan, reason: str) -> None:
        self.notes.append((kind, plan, reason))

    def unmirrored(self, capture: Capture, tables: tuple[str, ...], reason: str) -> None:
        self.notes.append(("unmirrored", StatementPlan(*([None] * 4)), reason))  # type: ignore[arg-type]


def make(manager: FakeManager | None = None, **startup: str) -> tuple[Capture, FakeManager, list[bytes]]:
    manager = manager or FakeManager()
    written: list[bytes] = []
    capture = Capture(
        manager,  # type: ignore[arg-type]
        session="test",
        database="db",
        user="u",
        application_name="app",
        settings=SessionSettings(from_startup(startup)),
        write=written.append,
        known=lambda name: None,
    )
    capture.primary = "old"
    return capture, manager, written


def frames_of(*raws: bytes) -> list[tuple[int, bytes]]:
    return [(raw[0], raw) for raw in raws]


def test_simple_insert_gets_an_image_column_the_client_never_sees() -> None:
    capture, manager, _ = make()
    edited = capture.request(frames_of(Query("insert into t (a) values (1)").encode()))
    assert edited is not None
    sent = edited[0][1][5:-1].decode()
    assert sent.endswith("RETURNING row_to_json(t.*)::text AS pgshift_row")
    reply = row_desc("pgshift_row") + data_row(b'{"id":1,"a":1}') + complete("INSERT 0 1") + ready()
    assert capture.feed(reply) == complete("INSERT 0 1") + ready()  # no RETURNING asked: no rows shown
    [(_, writes)] = manager.commits
    [write] = writes
    assert write.kind is WriteKind.IMAGE and write.image is not None
    assert write.image.op is ImageOp.INSERT and write.image.rows == (b'{"id":1,"a":1}',) and write.tag == "INSERT 0 1"


def test_client_returning_keeps_its_columns_and_rows() -> None:
    capture, manager, _ = make()
    capture.request(frames_of(Query("insert into t (a) values (1), (2) returning a").encode()))
    reply = (
        row_desc("a", "pgshift_row") + data_row(b"1", b'{"a":1}') + data_row(b"2", b'{"a":2}') + complete("INSERT 0 2")
    )
    # Fed in awkward pieces: the tap must reassemble what it edits.
    out = b"".join(capture.feed(reply[i : i + 7]) for i in range(0, len(reply), 7)) + capture.feed(ready())
    assert out == row_desc("a") + data_row(b"1") + data_row(b"2") + complete("INSERT 0 2") + ready()
    assert manager.commits[0][1][0].image.rows == (b'{"a":1}', b'{"a":2}')  # type: ignore[union-attr]


def test_transaction_buffered_until_commit_and_dropped_on_rollback() -> None:
    capture, manager, _ = make()
    for sql, reply in [
        ("begin", complete("BEGIN") + ready(b"T")),
        ("update t set a = 2 where id = 1", complete("UPDATE 1") + ready(b"T")),
        ("savepoint s1", complete("SAVEPOINT") + ready(b"T")),
        ("update t set a = 3 where id = 1", complete("UPDATE 1") + ready(b"T")),
        ("rollback to savepoint s1", complete("ROLLBACK") + ready(b"T")),
        ("update t set a = 4 where id = 1", ERROR + ready(b"E")),
        ("rollback to s1", complete("ROLLBACK") + ready(b"T")),
        ("delete from t where id = 9", complete("DELETE 0") + ready(b"T")),
    ]:
        capture.request(frames_of(Query(sql).encode()))
        capture.feed(reply)
        assert not manager.commits
    capture.request(frames_of(Query("commit").encode()))
    capture.feed(complete("COMMIT") + ready())
    [(_, writes)] = manager.commits
    assert [(w.sql, w.tag) for w in writes] == [("update t set a = 2 where id = 1", "UPDATE 1"),
                                               ("delete from t where id = 9", "DELETE 0")]  # fmt: skip
    capture.request(frames_of(Query("begin; update t set a = 5 where id = 1; rollback").encode()))
    capture.feed(complete("BEGIN") + complete("UPDATE 1") + complete("ROLLBACK") + ready())
    assert len(manager.commits) == 1


def test_failed_implicit_transaction_and_failed_commit_are_dropped() -> None:
    capture, manager, _ = make()
    capture.request(frames_of(Query("update t set a = 1 where id = 1; update t set a = 1 where id = 2").encode()))
    capture.feed(complete("UPDATE 1") + ERROR + ready())
    capture.request(frames_of(Query("begin").encode(), Query("update t set a = 1 where id = 1").encode()))
    capture.feed(complete("BEGIN") + ready(b"T") + complete("UPDATE 1") + ready(b"T"))
    capture.request(frames_of(Query("select 1/0").encode()))
    capture.feed(ERROR + ready(b"E"))
    capture.request(frames_of(Query("commit").encode()))
    capture.feed(complete("ROLLBACK") + ready())
    assert manager.commits == []


def test_extended_protocol_describe_bind_formats_and_row_limit() -> None:
    capture, manager, _ = make()
    parse = Parse("s1", "insert into t (a) values ($1) returning id, a").encode()
    edited = capture.request(frames_of(parse, msg(b"D", b"S" + cstr("s1")), SYNC))
    assert edited is not None and b"pgshift_row" in edited[0][1]
    described = PARSE_OK + msg(b"t", struct.pack("!hI", 1, 23)) + row_desc("id", "a", "pgshift_row") + ready()
    assert capture.feed(described) == PARSE_OK + msg(b"t", struct.pack("!hI", 1, 23)) + row_desc("id", "a") + ready()
    # Binary results for each column: the image column gets a format too; a row limit is lifted.
    edited = capture.request(frames_of(bind("s1", (b"7",), (1, 1)), execute(limit=1), SYNC))
    assert edited is not None
    assert edited[0][1] == bind("s1", (b"7",), (1, 1, 0)) and edited[1][1] == execute(0)
    reply = BIND_OK + data_row(b"\x00\x00\x00\x01", b"7", b'{"id":1,"a":7}') + complete("INSERT 0 1") + ready()
    # One row asked for, one row there: the client sees PortalSuspended, as from Postgres.
    assert capture.feed(reply) == BIND_OK + data_row(b"\x00\x00\x00\x01", b"7") + wireedit.PORTAL_SUSPENDED + ready()
    assert manager.commits[0][1][0].tag == "INSERT 0 1"


def test_replayed_extended_write_keeps_the_clients_frames() -> None:
    capture, manager, _ = make()
    parse = Parse("", "update t set a = $1 where id = $2").encode()
    assert capture.request(frames_of(parse, bind("", (b"5", b"1"), (1,)), execute(), SYNC)) is None
    capture.feed(PARSE_OK + BIND_OK + complete("UPDATE 1") + ready())
    [write] = manager.commits[0][1]
    assert write.kind is WriteKind.EXTENDED and write.parse == parse
    assert write.bind == bind("", (b"5", b"1"))  # result formats dropped: the mirror's rows are discarded


def test_unsafe_and_ddl_policies() -> None:
    capture, manager, _ = make(FakeManager(unsafe="reject"))
    with pytest.raises(Rejected, match="writable CTE"):
        capture.request(frames_of(Query("with x as (delete from t returning *) select 1").encode()))
    capture, manager, _ = make(FakeManager(ddl="reject"))
    with pytest.raises(Rejected, match="DDL"):
        capture.request(frames_of(Query("create table x (a int)").encode()))
    capture, manager, _ = make()
    capture.request(frames_of(Query("create table x (a int)").encode()))
    capture.feed(complete("CREATE TABLE") + ready())
    assert manager.commits == [] and manager.notes[0][0] == "ddl"


def test_sync_mode_holds_the_answer_until_the_mirrors_confirm() -> None:
    loop = asyncio.new_event_loop()
    try:
        manager = FakeManager()
        manager.wait = loop.create_future()
        capture, _, written = make(manager)
        capture.request(frames_of(Query("update t set a = 1 where id = 1").encode()))
        assert capture.feed(complete("UPDATE 1") + ready() + msg(b"N", b"\x00")) == complete("UPDATE 1")
        assert written == []
        manager.wait.set_result("mirror late")
        loop.run_until_complete(asyncio.sleep(0))
        [released] = written
        assert released.startswith(b"N") and b"mirror late" in released
        assert released.endswith(ready() + msg(b"N", b"\x00"))
    finally:
        loop.close()


def test_settings_follow_the_session() -> None:
    capture, manager, _ = make(options="-c search_path=app", TimeZone="UTC")
    for sql, tag in [("set datestyle = iso, dmy", "SET"), ("begin", "BEGIN"), ("set local search_path = x", "SET")]:
        capture.request(frames_of(Query(sql).encode()))
        capture.feed(complete(tag) + ready(b"T" if sql != "set datestyle = iso, dmy" else b"I"))
    capture.request(frames_of(Query("update t set a = 1 where id = 1").encode()))
    capture.feed(complete("UPDATE 1") + ready(b"T"))
    capture.request(frames_of(Query("commit").encode()))
    capture.feed(complete("COMMIT") + ready())
    settings = dict(manager.commits[0][0])
    assert settings == {"DateStyle": "iso, dmy", "TimeZone": "UTC", "search_path": "x"}
    assert changes('SET search_path TO a, "B c"') == (changes('set search_path = a, "B c"')[0],)
    assert changes('SET search_path TO a, "B c"')[0].value == 'a, "B c"'


def test_message_edits_reject_malformed_input() -> None:
    with pytest.raises(ProtocolViolation):
        wireedit.split_last_column(msg(b"D", struct.pack("!hi", 1, 10) + b"abc"))
    with pytest.raises(ProtocolViolation):
        wireedit.drop_last_field(msg(b"T", struct.pack("!h", 0)))
    with pytest.raises(ProtocolViolation):
        wireedit.bind_for_replay(msg(b"B", b"\x00\x00\x00"))
    trimmed, value = wireedit.split_last_column(data_row(b"a", None, b"{}"))
    assert trimmed == data_row(b"a", None) and value == b"{}"


def test_rules_pick_mode_and_policy_by_user_application_and_table() -> None:
    from proxy.config import parse_config
    from proxy.mirror.journal import Journal
    from proxy.mirror.manager import MirrorManager
    from proxy.routing import Live

    config = parse_config(
        {
            "backends": {"old": {"dsn": "postgresql://h/db"}, "new": {"dsn": "postgresql://u@h2/db"}},
            "routing": {"primary": "old", "mirrors": ["new"]},
            "mirror": {
                "unsafe": "reject",
                "rules": [
                    {"application_names": ["billing"], "mode": "sync", "sync_timeout": 2},
                    {"tables": ["payments"], "mode": "sync"},
                    {"users": ["etl"], "unsafe": "replay"},
                ],
            },
        }
    )
    manager = MirrorManager(Live(config), Journal(None))
    assert manager.policy("app", "web") == Policy("async", 5.0, "reject")
    assert manager.policy("app", "billing") == Policy("sync", 2.0, "reject")
    assert manager.policy("app", "web", ("public.payments",)) == Policy("sync", 5.0, "reject")
    assert manager.policy("etl", "web") == Policy("async", 5.0, "replay")
    assert manager.targets("old") == ("new",)
    assert manager.targets("new") == ("old",)  # (a session pinned to "new" after a flip back)


def test_mirror_config_errors_name_the_setting() -> None:
    from proxy.config import parse_config
    from proxy.errors import ConfigError

    base = {"backends": {"old": {"dsn": "postgresql://h/db"}, "new": {"dsn": "postgresql://h2/db"}}}
    with pytest.raises(ConfigError, match=r"backends\.new is a mirror but has no account to apply writes with"):
        parse_config({**base, "routing": {"primary": "old", "mirrors": ["new"]}})
    with pytest.raises(ConfigError, match=r"mirror\.mode"):
        parse_config({**base, "routing": {"primary": "old"}, "mirror": {"mode": "eventually"}})
    with pytest.raises(ConfigError, match="a mirror rule needs at least one of"):
        parse_config({**base, "routing": {"primary": "old"}, "mirror": {"rules": [{"mode": "sync"}]}})
    with pytest.raises(ConfigError, match=r"mirror\.queue_bytes"):
        parse_config({**base, "routing": {"primary": "old"}, "mirror": {"queue_bytes": 10}})


def test_no_rewrite_where_returning_would_break_the_write() -> None:
    """Tables the role cannot SELECT (or with rules, row security): the write runs as the client
    sent it, and the transaction's journal entry says it was not mirrored."""
    manager = FakeManager()
    manager.unrewritable = frozenset({"audit", "public.audit"})
    capture, _, _ = make(manager)
    assert capture.request(frames_of(Query("insert into public.audit (note) values ('x')").encode())) is None
    capture.feed(complete("INSERT 0 1") + ready())
    assert manager.commits == [] and manager.notes[0][0] == "unmirrored"
    assert "RETURNING would fail" in manager.notes[0][2]
    capture.request(frames_of(Query("create table y (a int)").encode()))
    capture.feed(complete("CREATE TABLE") + ready())
    assert manager.forgotten == 1  # DDL: asked again


def test_rounded_float_output_means_no_row_images() -> None:
    capture, manager, _ = make(extra_float_digits="0")
    assert capture.request(frames_of(Query("insert into t (x) values (0.1)").encode())) is None
    capture.feed(complete("INSERT 0 1") + ready())
    assert manager.commits == [] and manager.notes[0][0] == "unmirrored"
    capture, manager, _ = make(extra_float_digits="3")
    assert capture.request(frames_of(Query("insert into t (x) values (0.1)").encode())) is not None


def test_malformed_execute_is_a_protocol_violation() -> None:
    capture, _, _ = make()
    with pytest.raises(ProtocolViolation, match="Execute"):
        capture.request(frames_of(msg(b"E", cstr("") + b"\x00\x00"), SYNC))
