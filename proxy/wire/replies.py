"""The expected-reply FIFO of one backend connection and the scanner that applies it to replies.

Every frontend message the proxy sends to a backend that the backend will answer pushes one
entry; every reply that completes an answer pops one (PgDog's ProtocolState, PgBouncer's
outstanding_requests). The head entry says whether the replies belong to the client (forward)
or to the proxy (swallow: statements the proxy injected). After an ErrorResponse in the extended
protocol Postgres skips every message until Sync (protocol-flow.html, "Extended Query"), so the
FIFO drops the entries of those messages too.

The scanner finds message boundaries in the backend stream without copying bodies: whole chunks
are forwarded as they arrived, and a message bigger than a chunk (a 50 MB DataRow) streams through
piecewise, so proxy memory does not grow with row size.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

from proxy.errors import ProtocolViolation
from proxy.wire.codes import BackendCode, FrontendCode, TxStatus

_U32 = struct.Struct("!I")

# Entry kinds. Plain ints on the hot path; SWALLOW marks replies the client must not see.
PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, SYNC, QUERY, FUNCTION_CALL = range(1, 9)
SWALLOW = 0x100
# The replies are the proxy's own question (a catalog lookup): swallowed, and handed to the
# scanner's on_capture callback when complete.
CAPTURE = 0x200
_KIND = 0xFF
KIND_NAMES = {
    PARSE: "Parse",
    BIND: "Bind",
    DESCRIBE: "Describe",
    EXECUTE: "Execute",
    CLOSE: "Close",
    SYNC: "Sync",
    QUERY: "Query",
    FUNCTION_CALL: "FunctionCall",
}

# Frontend code → entry kind (0: the message gets no reply of its own: Flush, CopyData, …).
_EXPECT_FOR = [0] * 256
for _code, _kind in (
    (FrontendCode.PARSE, PARSE),
    (FrontendCode.BIND, BIND),
    (FrontendCode.DESCRIBE, DESCRIBE),
    (FrontendCode.EXECUTE, EXECUTE),
    (FrontendCode.CLOSE, CLOSE),
    (FrontendCode.SYNC, SYNC),
    (FrontendCode.QUERY, QUERY),
    (FrontendCode.FUNCTION_CALL, FUNCTION_CALL),
):
    _EXPECT_FOR[_code] = _kind
EXPECT_FOR: tuple[int, ...] = tuple(_EXPECT_FOR)
_TERMINATE = FrontendCode.TERMINATE.value

# What a backend message does to the FIFO. 0: nothing (DataRow, CopyData, ParameterDescription …
# belong to the head entry). Actions at or below _NEEDS_BODY read the message body.
_A_READY, _A_PARAM, _A_ERROR, _A_ASYNC, _A_EXEC_DONE, _A_COMPLETE, _A_DESCRIBED, _A_COPY_IN = range(1, 9)
# An ErrorResponse is read whole for its SQLSTATE (errors are rare and bounded by max_size).
_NEEDS_BODY = _A_ERROR
_ACTIONS = [0] * 256
for _bcode, _action in (
    (BackendCode.READY_FOR_QUERY, _A_READY),
    (BackendCode.PARAMETER_STATUS, _A_PARAM),
    (BackendCode.NOTICE_RESPONSE, _A_ASYNC),
    (BackendCode.NOTIFICATION_RESPONSE, _A_ASYNC),
    (BackendCode.ERROR_RESPONSE, _A_ERROR),
    (BackendCode.COMMAND_COMPLETE, _A_EXEC_DONE),
    (BackendCode.EMPTY_QUERY_RESPONSE, _A_EXEC_DONE),
    (BackendCode.PORTAL_SUSPENDED, _A_EXEC_DONE),
    (BackendCode.PARSE_COMPLETE, _A_COMPLETE),
    (BackendCode.BIND_COMPLETE, _A_COMPLETE),
    (BackendCode.CLOSE_COMPLETE, _A_COMPLETE),
    (BackendCode.NO_DATA, _A_DESCRIBED),
    (BackendCode.ROW_DESCRIPTION, _A_DESCRIBED),
    (BackendCode.COPY_IN_RESPONSE, _A_COPY_IN),
):
    _ACTIONS[_bcode] = _action
ACTIONS: tuple[int, ...] = tuple(_ACTIONS)
_ERROR_RESPONSE = BackendCode.ERROR_RESPONSE.value


class ExpectedReplies:
    """The FIFO itself: pure bookkeeping, no bytes."""

    __slots__ = ("_q", "skip_until_sync", "swallowing")

    def __init__(self) -> None:
        self._q: deque[int] = deque()
        self.skip_until_sync = False
        self.swallowing = 0  # entries with SWALLOW: zero lets the scanner forward chunks whole

    def __len__(self) -> int:
        return len(self._q)

    def __repr__(self) -> str:
        items = [KIND_NAMES[e & _KIND] + ("(swallow)" if e & SWALLOW else "") for e in self._q]
        return f"ExpectedReplies({items}, skip_until_sync={self.skip_until_sync})"

    def push_frontend(self, code: int, swallow: bool = False, capture: bool = False) -> None:
        """Record a frontend message just sent to the backend."""
        kind = EXPECT_FOR[code]
        if not kind:
            return
        if capture:
            self.swallowing += 1
            self._q.append(kind | SWALLOW | CAPTURE)
            return
        if self.skip_until_sync:
            # The backend discards everything up to Sync after an error; expect nothing back.
            if kind != SYNC:
                return
            self.skip_until_sync = False
        if swallow:
            self.swallowing += 1
            self._q.append(kind | SWALLOW)
        else:
            self._q.append(kind)

    def push_frames(self, frames: list[tuple[int, int, int]]) -> int:
        """Record a batch of forwarded frames (FrameReader offsets); return the start offset of a
        Terminate among them, or -1. One call per client chunk instead of one per message."""
        if self.skip_until_sync:
            for code, start, _end in frames:
                if code == _TERMINATE:
                    return start
                self.push_frontend(code)
            return -1
        append = self._q.append
        expect = EXPECT_FOR
        for code, start, _end in frames:
            kind = expect[code]
            if kind:
                append(kind)
            elif code == _TERMINATE:
                return start
        return -1

    def push_raw(self, frames: list[tuple[int, bytes]]) -> None:
        """Record a request's frames (type code, whole message) just sent: one call per request."""
        if self.skip_until_sync:
            for code, _raw in frames:
                self.push_frontend(code)
            return
        append = self._q.append
        expect = EXPECT_FOR
        for code, _raw in frames:
            kind = expect[code]
            if kind:
                append(kind)

    def error(self) -> None:
        """ErrorResponse while the head is an extended-protocol step: drop entries up to Sync."""
        q = self._q
        while q and (q[0] & _KIND) not in (SYNC, QUERY, FUNCTION_CALL):
            if q.popleft() & SWALLOW:
                self.swallowing -= 1
        if not q:
            self.skip_until_sync = True

    def copy_in_started(self) -> None:
        """CopyInResponse: Postgres ignores Sync while in copy-in mode (copyfromparse.c), so the
        Sync libpq sends right behind a COPY's Execute (PQexecParams) gets no ReadyForQuery; only
        the one sent after CopyDone/CopyFail does. Drop the Syncs queued behind the COPY.
        (Assumes the client waits for CopyInResponse before ending the copy, as libpq does.)"""
        q = self._q
        if len(q) > 1:
            head = q.popleft()
            rest = [e for e in q if e & _KIND != SYNC]
            q.clear()
            q.append(head)
            q.extend(rest)
            self.recount()

    def recount(self) -> None:
        self.swallowing = sum(1 for e in self._q if e & SWALLOW)

    def clear(self) -> None:
        self._q.clear()
        self.skip_until_sync = False
        self.swallowing = 0


def error_sqlstate(data: bytes, start: int, end: int) -> str:
    """The Code field of an ErrorResponse body ``data[start:end]`` ("XX000" if it has none)."""
    pos = start
    while pos < end and data[pos]:
        stop = data.find(b"\0", pos + 1, end)
        if stop < 0:
            break
        if data[pos] == 0x43:  # 'C': SQLSTATE (protocol-error-fields.html)
            return data[pos + 1 : stop].decode("ascii", "replace")
        pos = stop + 1
    return "XX000"


class ReplyScanner:
    """Backend → client stream: apply the FIFO, return the bytes that go to the client."""

    __slots__ = (
        "_fwd",
        "_pending",
        "_skip",
        "captured",
        "errors",
        "expected",
        "last_code",
        "max_size",
        "on_capture",
        "on_error",
        "on_parameter",
        "tx_status",
    )

    def __init__(
        self,
        expected: ExpectedReplies,
        max_size: int,
        on_parameter: Callable[[bytes], None] | None = None,
    ) -> None:
        self.expected = expected
        self.max_size = max_size
        self.on_parameter = on_parameter
        self.tx_status = TxStatus.IDLE.value
        self._pending = b""  # an incomplete header, or an incomplete inspected message
        self._skip = 0  # body bytes of a passthrough message still to come
        self._fwd = True  # whether those bytes go to the client
        self.last_code = 0  # type of the last message started so far
        self.errors = 0  # ErrorResponses forwarded to the client (read failover watches this)
        self.captured: list[bytes] = []  # whole messages answering a CAPTURE entry
        self.on_capture: Callable[[list[bytes]], None] | None = None
        self.on_error: Callable[[str], None] | None = None  # SQLSTATE of each error the client gets

    @property
    def idle(self) -> bool:
        """No reply outstanding: the backend waits for the next request."""
        return not self.expected._q and not self._skip and not self._pending

    @property
    def ended_with_error(self) -> bool:
        """The stream so far ends with a whole ErrorResponse (a backend that sends FATAL, e.g. on
        pg_terminate_backend, and closes has told the client why itself)."""
        return self.last_code == _ERROR_RESPONSE and not self._skip and not self._pending

    def feed(self, data: bytes) -> bytes:
        # One flat loop on purpose: this runs for every reply the proxy relays. While no injected
        # statement is outstanding (nearly always) every byte is the client's, and the chunk is
        # forwarded as it came; the cutting logic runs only when something must be swallowed.
        if self._pending:
            data = self._pending + data
            self._pending = b""
        n = len(data)
        pos = 0
        run_start = 0  # start of the current forwarded run; -1 while swallowing
        skip = self._skip
        if skip:
            # The rest of a message that started in an earlier chunk: its fate is already known.
            take = skip if skip < n else n
            self._skip = skip - take
            if take == n:
                return data if self._fwd else b""
            pos = take
            if not self._fwd:
                run_start = -1
        expected = self.expected
        q = expected._q
        cutting = expected.swallowing > 0 or run_start < 0
        runs: list[bytes] = []
        unpack = _U32.unpack_from
        actions = ACTIONS
        max_size = self.max_size
        fwd = True
        code = -1
        while n - pos >= 5:
            code = data[pos]
            (length,) = unpack(data, pos + 1)
            if length < 4 or length > max_size:
                raise ProtocolViolation(f"backend sent invalid message length {length} for type {chr(code)!r}")
            end = pos + 1 + length
            action = actions[code]
            if action and action <= _NEEDS_BODY and end > n:
                break  # a small message we must read whole: hold it back until it is
            if cutting and q and q[0] & CAPTURE and action != _A_ASYNC:
                if end > n:
                    break  # captured answers are small: keep the message whole
                self.captured.append(data[pos:end])
            if cutting:
                # Whose reply is this? Decided before the action below pops the head. A
                # ParameterStatus caused by a statement the proxy injected (a SET replayed on a
                # read backend) is the proxy's too: the client sees only the primary's values.
                fwd = action == _A_ASYNC or not q or not q[0] & SWALLOW
                if fwd:
                    if run_start < 0:
                        run_start = pos
                elif run_start >= 0:
                    if pos > run_start:
                        runs.append(data[run_start:pos])
                    run_start = -1
            if action:
                if action == _A_READY:
                    self.tx_status = data[pos + 5]
                    if q and q.popleft() & CAPTURE:
                        captured, self.captured = self.captured, []
                        if self.on_capture is not None:
                            self.on_capture(captured)
                elif action == _A_EXEC_DONE:
                    if q and q[0] & _KIND == EXECUTE:
                        q.popleft()
                elif action == _A_COMPLETE:
                    if q:
                        q.popleft()
                elif action == _A_DESCRIBED:
                    if q and q[0] & _KIND == DESCRIBE:
                        q.popleft()
                elif action == _A_ERROR:
                    if fwd:
                        self.errors += 1
                        if self.on_error is not None:
                            self.on_error(error_sqlstate(data, pos + 5, end))
                    if q and q[0] & _KIND not in (QUERY, FUNCTION_CALL, SYNC):
                        expected.error()
                elif action == _A_PARAM and self.on_parameter is not None:
                    self.on_parameter(data[pos + 5 : end])
                elif action == _A_COPY_IN:
                    expected.copy_in_started()
            if end > n:
                # A message bigger than what arrived: stream its body through as it comes.
                self._skip = end - n
                self._fwd = fwd
                pos = n
                break
            pos = end
        if code >= 0:
            self.last_code = code
        if pos < n:
            self._pending = data[pos:]
        if not cutting:
            return data if pos == n else data[:pos]
        expected.recount()
        if run_start >= 0 and pos > run_start:
            runs.append(data[run_start:pos])
        return b"".join(runs)
