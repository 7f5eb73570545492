"""The sans-IO codec: message round trips, framing under any chunking, garbage, the reply FIFO."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import FeatureNotSupported, ProtocolViolation
from proxy.wire.codes import FRONTEND_CODES, AuthCode, TxStatus
from proxy.wire.framing import FrameReader
from proxy.wire.messages import (
    Authentication,
    BackendKeyData,
    CancelRequest,
    Close,
    CommandComplete,
    ErrorResponse,
    GSSENCRequest,
    NoticeResponse,
    ParameterStatus,
    Parse,
    PasswordMessage,
    Query,
    ReadyForQuery,
    SASLInitialResponse,
    SSLRequest,
    StartupMessage,
    decode_startup_packet,
    frame,
)
from proxy.wire.replies import SWALLOW, ExpectedReplies, ReplyScanner

MAX = 1 << 20


def body(encoded: bytes) -> bytes:
    return encoded[5:]


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        ParameterStatus("TimeZone", "Europe/Berlin"),
        BackendKeyData(1234, -99),
        ReadyForQuery(TxStatus.IN_TRANSACTION),
        Query("select 'ü'"),
        Parse("s1", "select $1", (23, 25)),
        Close(b"S", "s1"),
        Close(b"P", ""),
        CommandComplete("INSERT 0 3"),
        PasswordMessage(b"secret"),
        SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc"),
        Authentication(AuthCode.MD5_PASSWORD, b"salt"),
        ErrorResponse.build("ERROR", "23505", "dup", detail="Key (id)=(1)", hint="h"),
        NoticeResponse({"S": "NOTICE", "C": "00000", "M": "hello"}),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip(msg: object) -> None:
    encoded = msg.encode()  # type: ignore[attr-defined]
    assert struct.unpack("!I", encoded[1:5])[0] == len(encoded) - 1
    assert type(msg).decode(body(encoded)) == msg  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "packet",
    [
        StartupMessage({"user": "alice", "database": "app", "application_name": "x"}),
        SSLRequest(),
        GSSENCRequest(),
        CancelRequest(42, -7),
    ],
    ids=lambda p: type(p).__name__,
)
def test_startup_packets_round_trip(packet: object) -> None:
    encoded = packet.encode()  # type: ignore[attr-defined]
    assert decode_startup_packet(encoded[4:]) == packet


def test_protocol_2_is_refused_clearly() -> None:
    with pytest.raises(FeatureNotSupported, match=r"unsupported frontend protocol 2\.0"):
        decode_startup_packet(struct.pack("!i", 2 << 16) + b"user\x00x\x00\x00")


def test_sasl_mechanisms() -> None:
    auth = Authentication.decode(body(Authentication.sasl(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]).encode()))
    assert auth.sasl_mechanisms() == ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]


# --- framing -----------------------------------------------------------------------------

STREAM = b"".join(
    [
        Query("select 1").encode(),
        Parse("", "select $1", (23,)).encode(),
        frame(ord("B"), b"\x00" * 40),
        frame(ord("E"), b"\x00\x00\x00\x00\x00"),
        frame(ord("S"), b""),
        frame(ord("d"), b"x" * 70_000),  # larger than any chunk below
    ]
)


def frames_of(reader: FrameReader, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    for chunk in chunks:
        buf, frames = reader.feed(chunk)
        out.extend((code, buf[start:end]) for code, start, end in frames)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


def test_whole_equals_byte_at_a_time() -> None:
    whole = frames_of(FrameReader(MAX), [STREAM])
    assert [c for c, _ in whole] == [ord(x) for x in "QPBESd"]
    assert b"".join(raw for _, raw in whole) == STREAM
    assert frames_of(FrameReader(MAX), [bytes([b]) for b in STREAM]) == whole


@given(st.lists(st.integers(min_value=0), max_size=30))
@settings(max_examples=200, deadline=None)
def test_any_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    reader = FrameReader(MAX)
    assert frames_of(reader, split(STREAM, cuts)) == frames_of(FrameReader(MAX), [STREAM])
    assert reader.buffered == 0


def test_oversized_message_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        FrameReader(8192).feed(frame(ord("Q"), b"x" * 9000))


def test_unknown_frontend_code_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation, match="invalid frontend message type"):
        FrameReader(MAX, FRONTEND_CODES).feed(frame(ord("z"), b""))


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=8))
@settings(max_examples=300, deadline=None)
def test_garbage_never_raises_anything_but_protocol_violation(data: bytes, cuts: list[int]) -> None:
    reader = FrameReader(4096, FRONTEND_CODES)
    with contextlib.suppress(ProtocolViolation):
        for chunk in split(data, cuts):
            reader.feed(chunk)
    with contextlib.suppress(ProtocolViolation, FeatureNotSupported):
        decode_startup_packet(data)
    with contextlib.suppress(ProtocolViolation):
        FrameReader(4096).feed_startup(data)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_message_decoders_reject_garbage_cleanly(data: bytes) -> None:
    for cls in (
        ParameterStatus,
        BackendKeyData,
        ReadyForQuery,
        Query,
        Parse,
        ErrorResponse,
        Authentication,
        PasswordMessage,
        SASLInitialResponse,
        CommandComplete,
    ):
        with contextlib.suppress(ProtocolViolation):
            cls.decode(data)  # type: ignore[attr-defined]


# --- the expected-reply FIFO and scanner -------------------------------------------------

PARSE_OK = frame(ord("1"), b"")
BIND_OK = frame(ord("2"), b"")
ROW_DESC = frame(ord("T"), b"\x00\x00")
ROW = frame(ord("D"), b"\x00\x01\x00\x00\x00\x01x")
DONE = frame(ord("C"), b"SELECT 1\x00")
ERROR = ErrorResponse.build("ERROR", "22012", "division by zero").encode()
NOTICE = NoticeResponse({"S": "NOTICE", "M": "n"}).encode()


def rfq(status: str = "I") -> bytes:
    return frame(ord("Z"), status.encode())


def scanner_with(*codes: str, swallow: tuple[str, ...] = ()) -> ReplyScanner:
    fifo = ExpectedReplies()
    for c in codes:
        fifo.push_frontend(ord(c))
    for c in swallow:
        fifo.push_frontend(ord(c), swallow=True)
    return ReplyScanner(fifo, MAX)


def feed_chunked(scanner: ReplyScanner, data: bytes, cuts: list[int]) -> bytes:
    return b"".join(scanner.feed(chunk) for chunk in split(data, cuts) if chunk)


EXTENDED = PARSE_OK + BIND_OK + ROW_DESC + ROW + DONE + rfq()


@given(st.lists(st.integers(min_value=0), max_size=20))
@settings(max_examples=200, deadline=None)
def test_scanner_forwards_everything_under_any_chunking(cuts: list[int]) -> None:
    scanner = scanner_with("P", "B", "D", "E", "S")
    assert feed_chunked(scanner, EXTENDED, cuts) == EXTENDED
    assert scanner.idle
    assert len(scanner.expected) == 0


def test_scanner_swallows_injected_replies_only() -> None:
    # The proxy injected a Parse (swallowed) in front of the client's Bind/Execute/Sync.
    fifo = ExpectedReplies()
    fifo.push_frontend(ord("P"), swallow=True)
    for c in "BES":
        fifo.push_frontend(ord(c))
    scanner = ReplyScanner(fifo, MAX)
    out = feed_chunked(scanner, NOTICE + EXTENDED, [3, 11, 20])
    assert out == NOTICE + BIND_OK + ROW_DESC + ROW + DONE + rfq()
    assert scanner.idle


def test_error_in_extended_protocol_skips_until_sync() -> None:
    scanner = scanner_with("P", "B", "E", "S")
    out = scanner.feed(ERROR + rfq())
    assert out == ERROR + rfq()
    assert scanner.idle


def test_error_before_sync_was_sent_ignores_messages_until_sync() -> None:
    fifo = ExpectedReplies()
    for c in "PBE":
        fifo.push_frontend(ord(c))
    scanner = ReplyScanner(fifo, MAX)
    scanner.feed(PARSE_OK + ERROR)
    assert fifo.skip_until_sync
    fifo.push_frontend(ord("B"))  # discarded by the server: expect nothing
    fifo.push_frontend(ord("S"))
    assert len(fifo) == 1
    scanner.feed(rfq())
    assert scanner.idle


def test_simple_query_with_error_and_transaction_status() -> None:
    scanner = scanner_with("Q")
    assert scanner.feed(ROW_DESC + ROW + ERROR + rfq("E")) == ROW_DESC + ROW + ERROR + rfq("E")
    assert scanner.tx_status == TxStatus.FAILED
    assert scanner.idle


def test_huge_row_streams_piecewise_without_buffering() -> None:
    fifo = ExpectedReplies()
    fifo.push_frontend(ord("Q"))
    scanner = ReplyScanner(fifo, 1 << 30)
    big = frame(ord("D"), b"y" * 5_000_000)
    data = ROW_DESC + big + DONE + rfq()
    out = []
    for i in range(0, len(data), 65536):
        chunk = scanner.feed(data[i : i + 65536])
        assert len(scanner._pending) < 10
        out.append(chunk)
    assert b"".join(out) == data
    assert scanner.idle


def test_parameter_status_is_reported() -> None:
    seen: list[bytes] = []
    fifo = ExpectedReplies()
    fifo.push_frontend(ord("Q"))
    scanner = ReplyScanner(fifo, MAX, on_parameter=seen.append)
    msg = ParameterStatus("application_name", "x").encode()
    assert feed_chunked(scanner, DONE + msg + rfq(), [7, 8, 9]) == DONE + msg + rfq()
    assert [ParameterStatus.decode(s) for s in seen] == [ParameterStatus("application_name", "x")]


def test_backend_garbage_length_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        scanner_with("Q").feed(b"D\x00\x00\x00\x01")


def test_swallow_flag_constant_is_outside_kinds() -> None:
    assert SWALLOW > 0xFF


def test_push_frames_records_replies_and_finds_terminate() -> None:
    fifo = ExpectedReplies()
    data = Query("select 1").encode() + frame(ord("H"), b"") + frame(ord("X"), b"")
    _buf, frames = FrameReader(MAX).feed(data)
    assert fifo.push_frames(frames) == len(data) - 5
    assert len(fifo) == 1  # Query expects an answer; Flush does not
    fifo.skip_until_sync = True
    _, frames = FrameReader(MAX).feed(frame(ord("B"), b"") + frame(ord("S"), b""))
    assert fifo.push_frames(frames) == -1
    assert len(fifo) == 2 and not fifo.skip_until_sync  # Bind skipped, Sync expected


def test_captured_replies_go_to_the_proxy_not_the_client() -> None:
    fifo = ExpectedReplies()
    fifo.push_frontend(ord("Q"), capture=True)
    fifo.push_frontend(ord("Q"))
    scanner = ReplyScanner(fifo, MAX)
    got: list[list[bytes]] = []
    scanner.on_capture = got.append
    mine = ROW_DESC + ROW + DONE + rfq()
    theirs = ROW_DESC + ROW + DONE + rfq()
    assert feed_chunked(scanner, mine + NOTICE + theirs, [4, 9, 17, 30]) == NOTICE + theirs
    assert got == [[ROW_DESC, ROW, DONE, rfq()]]
    assert scanner.idle


def test_data_row_decoding() -> None:
    from proxy.wire.messages import decode_data_row

    assert decode_data_row(b"\x00\x02\x00\x00\x00\x02ab\xff\xff\xff\xff") == [b"ab", None]
    with pytest.raises(ProtocolViolation):
        decode_data_row(b"\x00\x01\x00\x00\x00\x09ab")


@given(st.binary(max_size=100))
@settings(max_examples=200, deadline=None)
def test_data_row_garbage_is_a_protocol_violation(data: bytes) -> None:
    from proxy.wire.messages import decode_data_row

    with contextlib.suppress(ProtocolViolation):
        decode_data_row(data)


def test_close_rejects_an_unknown_target() -> None:
    with pytest.raises(ProtocolViolation, match="neither 'S' nor 'P'"):
        Close.decode(b"Xname\x00")
    with pytest.raises(ProtocolViolation):
        Close.decode(b"Sname")  # no terminator
