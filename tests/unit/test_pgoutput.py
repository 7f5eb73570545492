"""The pgoutput decoder and the replication CopyData framing, on hand-built bytes (PG15 formats)."""

from __future__ import annotations

import contextlib
import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.cdc.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PrimaryKeepalive,
    Relation,
    RelationCache,
    RelationColumn,
    StandbyStatusUpdate,
    Truncate,
    TupleData,
    TypeMessage,
    Update,
    Value,
    XLogData,
    decode_copy_data,
    decode_message,
    format_lsn,
    parse_lsn,
    pg_now,
    pg_timestamp,
)
from proxy.errors import ProtocolViolation

# --- builders: the wire formats of protocol-logicalrep-message-formats.html ------------------


def u8(v: int) -> bytes:
    return struct.pack("!B", v)


def i16(v: int) -> bytes:
    return struct.pack("!h", v)


def u32(v: int) -> bytes:
    return struct.pack("!I", v)


def i32(v: int) -> bytes:
    return struct.pack("!i", v)


def u64(v: int) -> bytes:
    return struct.pack("!Q", v)


def i64(v: int) -> bytes:
    return struct.pack("!q", v)


def cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def tup(*cols: Value | tuple[str, bytes]) -> bytes:
    """TupleData: None → 'n', UNCHANGED → 'u', bytes → 't', ("b", bytes) → 'b'."""
    out = i16(len(cols))
    for col in cols:
        if col is None:
            out += b"n"
        elif col is UNCHANGED:
            out += b"u"
        elif isinstance(col, tuple):
            out += b"b" + i32(len(col[1])) + col[1]
        else:
            assert isinstance(col, bytes)
            out += b"t" + i32(len(col)) + col
    return out


LSN_A = 0x16_B374D848
LSN_B = 0x16_B374D8A0
TS = 800_000_000_123_456  # µs since 2000-01-01
OID = 16_384
BIG_OID = 4_000_000_000  # OIDs are unsigned: above 2^31 they must not come out negative

BEGIN = b"B" + u64(LSN_A) + i64(TS) + u32(4_000_000_001)
COMMIT = b"C" + u8(0) + u64(LSN_A) + u64(LSN_B) + i64(TS)
ORIGIN = b"O" + u64(LSN_A) + cstr("node_1")
RELATION = (
    b"R"
    + u32(OID)
    + cstr("shop")
    + cstr("orders")
    + b"d"
    + i16(3)
    + u8(1)
    + cstr("id")
    + u32(23)
    + i32(-1)
    + u8(0)
    + cstr("note")
    + u32(25)
    + i32(-1)
    + u8(0)
    + cstr("price")
    + u32(1700)
    + i32(0x000A0006)  # numeric(10,2): ((10 << 16) | 2) + VARHDRSZ
)
TYPE = b"Y" + u32(BIG_OID) + cstr("shop") + cstr("mood")
INSERT = b"I" + u32(OID) + b"N" + tup(b"1", None, b"9.99")
# Key changed (old 'K' tuple: key only, the rest null) and the TOASTed note left as it was.
UPDATE_KEY = b"U" + u32(OID) + b"K" + tup(b"1", None, None) + b"N" + tup(b"2", UNCHANGED, b"10.00")
UPDATE_FULL = b"U" + u32(OID) + b"O" + tup(b"2", b"old", b"1") + b"N" + tup(b"2", b"new", b"1")
UPDATE_NEW_ONLY = b"U" + u32(OID) + b"N" + tup(b"2", UNCHANGED, b"11.00")
DELETE_KEY = b"D" + u32(OID) + b"K" + tup(b"2", None, None)
DELETE_FULL = b"D" + u32(OID) + b"O" + tup(b"2", b"x", ("b", b"\x00\x01"))
TRUNCATE = b"T" + i32(2) + u8(3) + u32(OID) + u32(BIG_OID)
MESSAGE = b"M" + u8(1) + u64(LSN_A) + cstr("pgshift") + i32(5) + b"hello"

VALID = {
    "Begin": BEGIN,
    "Commit": COMMIT,
    "Origin": ORIGIN,
    "Relation": RELATION,
    "Type": TYPE,
    "Insert": INSERT,
    "Update": UPDATE_KEY,
    "Update(full)": UPDATE_FULL,
    "Update(new only)": UPDATE_NEW_ONLY,
    "Delete": DELETE_KEY,
    "Delete(full)": DELETE_FULL,
    "Truncate": TRUNCATE,
    "Message": MESSAGE,
}


# --- every message type ----------------------------------------------------------------------


def test_begin_and_commit() -> None:
    assert decode_message(BEGIN) == Begin(final_lsn=LSN_A, commit_time=TS, xid=4_000_000_001)
    commit = decode_message(COMMIT)
    assert commit == Commit(flags=0, commit_lsn=LSN_A, end_lsn=LSN_B, commit_time=TS)
    # date -u -d @$((946684800 + 800000000)): Thu May  8 06:13:20 UTC 2025
    assert pg_timestamp(TS) == datetime(2025, 5, 8, 6, 13, 20, 123456, tzinfo=UTC)


def test_origin() -> None:
    assert decode_message(ORIGIN) == Origin(commit_lsn=LSN_A, name="node_1")


def test_relation() -> None:
    rel = decode_message(RELATION)
    assert isinstance(rel, Relation)
    assert rel.relation_id == OID
    assert (rel.namespace, rel.name, rel.replica_identity) == ("shop", "orders", "d")
    assert rel.columns == (
        RelationColumn(1, "id", 23, -1),
        RelationColumn(0, "note", 25, -1),
        RelationColumn(0, "price", 1700, 0x000A0006),
    )
    assert rel.key_columns == ("id",)
    assert rel.qualified_name == "shop.orders"
    assert [c.key for c in rel.columns] == [True, False, False]


def test_relation_in_pg_catalog_has_an_empty_namespace() -> None:
    rel = decode_message(b"R" + u32(1) + cstr("") + cstr("pg_x") + b"n" + i16(0))
    assert isinstance(rel, Relation)
    assert rel.qualified_name == "pg_catalog.pg_x"
    assert rel.columns == ()


def test_type_oid_is_unsigned() -> None:
    assert decode_message(TYPE) == TypeMessage(type_oid=BIG_OID, namespace="shop", name="mood")


def test_insert() -> None:
    assert decode_message(INSERT) == Insert(OID, TupleData((b"1", None, b"9.99"), b"tnt"))


def test_update_with_old_key_and_unchanged_toast() -> None:
    upd = decode_message(UPDATE_KEY)
    assert isinstance(upd, Update)
    assert upd.old_kind == "K"
    assert upd.old == TupleData((b"1", None, None), b"tnn")
    assert upd.new.values == (b"2", UNCHANGED, b"10.00")
    assert upd.new.kinds == b"tut"
    # UNCHANGED is a sentinel of its own: neither NULL nor any value.
    assert upd.new.values[1] is UNCHANGED
    assert UNCHANGED is not None
    assert repr(UNCHANGED) == "UNCHANGED"


def test_update_with_full_old_row() -> None:
    upd = decode_message(UPDATE_FULL)
    assert upd == Update(
        OID, TupleData((b"2", b"new", b"1"), b"ttt"), old=TupleData((b"2", b"old", b"1"), b"ttt"), old_kind="O"
    )


def test_update_without_old_tuple() -> None:
    upd = decode_message(UPDATE_NEW_ONLY)
    assert isinstance(upd, Update)
    assert upd.old is None
    assert upd.old_kind is None
    assert upd.new.values == (b"2", UNCHANGED, b"11.00")


def test_delete_by_key_and_by_full_row() -> None:
    assert decode_message(DELETE_KEY) == Delete(OID, TupleData((b"2", None, None), b"tnn"), "K")
    full = decode_message(DELETE_FULL)
    assert isinstance(full, Delete)
    assert full.old_kind == "O"
    assert full.old.values == (b"2", b"x", b"\x00\x01")
    assert full.old.is_binary(2)
    assert not full.old.is_binary(1)


def test_truncate_options_and_relations() -> None:
    trunc = decode_message(TRUNCATE)
    assert trunc == Truncate(options=3, relation_ids=(OID, BIG_OID))
    assert isinstance(trunc, Truncate)
    assert trunc.cascade
    assert trunc.restart_identity
    plain = decode_message(b"T" + i32(1) + u8(2) + u32(OID))
    assert isinstance(plain, Truncate)
    assert (plain.cascade, plain.restart_identity, plain.relation_ids) == (False, True, (OID,))


def test_logical_message() -> None:
    assert decode_message(MESSAGE) == LogicalMessage(True, LSN_A, "pgshift", b"hello")
    other = decode_message(b"M" + u8(0) + u64(1) + cstr("") + i32(0))
    assert other == LogicalMessage(False, 1, "", b"")


def test_empty_and_zero_length_values() -> None:
    ins = decode_message(b"I" + u32(OID) + b"N" + tup(b"", None))
    assert isinstance(ins, Insert)
    assert ins.new.values == (b"", None)  # '' and NULL stay distinct


# --- relation cache --------------------------------------------------------------------------


def test_relation_cache_maps_tuples_to_columns() -> None:
    cache = RelationCache()
    cache.update(decode_message(RELATION))
    cache.update(decode_message(TYPE))
    cache.update(decode_message(BEGIN))  # ignored
    assert OID in cache
    assert len(cache) == 1
    assert cache.type(BIG_OID) == TypeMessage(BIG_OID, "shop", "mood")
    assert cache.type(23) is None
    upd = decode_message(UPDATE_KEY)
    assert isinstance(upd, Update)
    assert upd.old is not None
    assert cache.row(OID, upd.new) == {"id": b"2", "note": UNCHANGED, "price": b"10.00"}
    assert cache.row(OID, upd.old) == {"id": b"1", "note": None, "price": None}


def test_relation_cache_takes_the_newest_definition() -> None:
    cache = RelationCache()
    cache.update(decode_message(RELATION))
    altered = b"R" + u32(OID) + cstr("shop") + cstr("orders") + b"f" + i16(1) + u8(0) + cstr("id") + u32(20) + i32(-1)
    cache.update(decode_message(altered))
    assert cache.get(OID).replica_identity == "f"
    assert cache.row(OID, TupleData((b"7",), b"t")) == {"id": b"7"}
    cache.clear()
    assert OID not in cache


def test_relation_cache_refuses_unknown_relations_and_wrong_widths() -> None:
    cache = RelationCache()
    with pytest.raises(ProtocolViolation, match="relation 16384, which no Relation message announced"):
        cache.get(OID)
    cache.update(decode_message(RELATION))
    with pytest.raises(ProtocolViolation, match=r"shop\.orders has 2 columns.*announced 3"):
        cache.row(OID, TupleData((b"1", b"2"), b"tt"))


# --- LSNs and time ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lsn", "text"),
    [(0, "0/0"), (0x16_B374D848, "16/B374D848"), (0x1_00000000, "1/0"), ((1 << 64) - 1, "FFFFFFFF/FFFFFFFF")],
)
def test_lsn_text(lsn: int, text: str) -> None:
    assert format_lsn(lsn) == text
    assert parse_lsn(text) == lsn
    assert parse_lsn(text.lower()) == lsn


@pytest.mark.parametrize("bad", ["", "16", "16/", "/1", "G/0", "1/2/3", "123456789/0", "0x1/0", "-1/0"])
def test_parse_lsn_refuses_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        parse_lsn(bad)


def test_format_lsn_range() -> None:
    with pytest.raises(ValueError):
        format_lsn(-1)
    with pytest.raises(ValueError):
        format_lsn(1 << 64)


def test_pg_time() -> None:
    assert pg_timestamp(0) == datetime(2000, 1, 1, tzinfo=UTC)
    now = datetime.now(UTC)
    assert abs((pg_timestamp(pg_now()) - now).total_seconds()) < 5


# --- replication CopyData framing --------------------------------------------------------


def test_xlogdata() -> None:
    body = b"w" + u64(LSN_A) + u64(LSN_B) + i64(TS) + BEGIN
    item = decode_copy_data(body)
    assert item == XLogData(start_lsn=LSN_A, end_lsn=LSN_B, server_time=TS, payload=BEGIN)
    empty = decode_copy_data(b"w" + u64(1) + u64(2) + i64(3))
    assert isinstance(empty, XLogData)
    assert empty.payload == b""


def test_primary_keepalive() -> None:
    assert decode_copy_data(b"k" + u64(LSN_B) + i64(TS) + u8(1)) == PrimaryKeepalive(LSN_B, TS, True)
    assert decode_copy_data(b"k" + u64(LSN_B) + i64(-5) + u8(0)) == PrimaryKeepalive(LSN_B, -5, False)


def test_standby_status_update_bytes() -> None:
    update = StandbyStatusUpdate(write=LSN_B, flush=LSN_A, apply=LSN_A, client_time=TS, reply_requested=True)
    assert update.encode() == b"r" + u64(LSN_B) + u64(LSN_A) + u64(LSN_A) + i64(TS) + u8(1)
    assert len(update.encode()) == 34
    assert StandbyStatusUpdate(0, 0, 0, 0).encode()[-1:] == b"\x00"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "empty"),
        (b"w" + u64(1) + u64(2), "XLogData message: truncated header"),
        (b"k" + u64(1) + i64(2), "Primary keepalive message: 17 bytes"),
        (b"k" + u64(1) + i64(2) + u8(0) + b"x", "Primary keepalive message: 19 bytes"),
        (b"s" + u64(1) + u64(2) + i64(3), "unknown replication CopyData message type 's'"),
    ],
)
def test_malformed_copy_data(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        decode_copy_data(body)


# --- malformed pgoutput ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALID))
def test_every_truncation_is_a_protocol_violation_naming_the_message(name: str) -> None:
    data = VALID[name]
    kind = name.split("(")[0]
    for cut in range(1, len(data)):
        with pytest.raises(ProtocolViolation, match=f"malformed pgoutput {kind} message"):
            decode_message(data[:cut])


@pytest.mark.parametrize("name", list(VALID))
def test_trailing_bytes_are_a_protocol_violation(name: str) -> None:
    with pytest.raises(ProtocolViolation, match="1 unexpected bytes at the end"):
        decode_message(VALID[name] + b"\x00")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "malformed pgoutput message: empty"),
        (b"Z" + u32(1), "unknown pgoutput message type 'Z'"),
        (b"I" + u32(OID) + b"X" + tup(b"1"), r"Insert message: expected 'N' \(new tuple\), found 'X'"),
        (b"I" + u32(OID) + b"N" + i16(1) + b"x", "Insert message: unknown kind 'x' for column 1"),
        (b"I" + u32(OID) + b"N" + i16(-1), "Insert message: negative column count -1"),
        (b"I" + u32(OID) + b"N" + i16(1) + b"t" + i32(-1), "Insert message: negative length -1 for column 1"),
        (b"I" + u32(OID) + b"N" + i16(1) + b"t" + i32(10) + b"abc", "Insert message: truncated"),
        (b"U" + u32(OID) + b"Q" + tup(b"1"), "Update message: expected 'K', 'O' or 'N', found 'Q'"),
        (b"U" + u32(OID) + b"K" + tup(b"1") + b"K" + tup(b"2"), "Update message: expected 'N'.*after the old"),
        (b"D" + u32(OID) + b"N" + tup(b"1"), "Delete message: expected 'K' or 'O'"),
        (b"R" + u32(1) + cstr("s") + cstr("t") + b"x" + i16(0), "Relation message: unknown replica identity 'x'"),
        (b"R" + u32(1) + cstr("s") + cstr("t") + b"d" + i16(-2), "Relation message: negative column count"),
        (b"R" + u32(1) + b"\xff\xfe\x00" + cstr("t") + b"d" + i16(0), "Relation message: invalid UTF-8"),
        (b"O" + u64(1) + b"no terminator", "Origin message: unterminated string"),
        (b"T" + i32(-1) + u8(0), "Truncate message: negative relation count"),
        (b"T" + i32(1_000_000) + u8(0) + u32(1), "Truncate message: truncated"),
        (b"M" + u8(0) + u64(1) + cstr("p") + i32(-1), "Message message: truncated"),
    ],
)
def test_malformed_messages(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        decode_message(data)


@pytest.mark.parametrize("code", [b"S", b"E", b"c", b"A", b"b", b"P", b"K", b"r", b"p"])
def test_newer_protocol_messages_are_refused_with_a_hint(code: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="newer protocol version") as info:
        decode_message(code + u32(1))
    assert info.value.hint is not None
    assert "proto_version '1'" in info.value.hint


@given(st.sampled_from(b"BCORYIUDTM"), st.binary(max_size=64))
def test_garbage_only_ever_raises_protocol_violation(code: int, rest: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        decode_message(bytes([code]) + rest)


@given(st.binary(max_size=40))
def test_copy_data_garbage_only_ever_raises_protocol_violation(data: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        decode_copy_data(data)
