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

_Z = BackendCode.READY_FOR_QUERY.value
_S = BackendCode.PARAMETER_STATUS.value
_E = BackendCode.ERROR_RESPONSE.value
_N = BackendCode.NOTICE_RESPONSE.value
_A = BackendCode.NOTIFICATION_RESPONSE.value
_PARSE_COMPLETE = BackendCode.PARSE_COMPLETE.value
_BIND_COMPLETE = BackendCode.BIND_COMPLETE.value
_CLOSE_COMPLETE = BackendCode.CLOSE_COMPLETE.value
_NO_DATA = BackendCode.NO_DATA.value
_ROW_DESCRIPTION = BackendCode.ROW_DESCRIPTION.value
_EXEC_DONE = frozenset(
    (
        BackendCode.COMMAND_COMPLETE.value,
        BackendCode.EMPTY_QUERY_RESPONSE.value,
        BackendCode.PORTAL_SUSPENDED.value,
    )
)
_ASYNC = frozenset((_N, _A, _S))  # may arrive at any time; always the client's
_INSPECT = frozenset((_Z, _S))  # bodies the scanner needs (tiny messages)


class ExpectedReplies:
    """The FIFO itself: pure bookkeeping, no bytes."""

    __slots__ = ("_q", "skip_until_sync")

    def __init__(self) -> None:
        self._q: deque[int] = deque()
        self.skip_until_sync = False

    def __len__(self) -> int:
        return len(self._q)

    def __repr__(self) -> str:
        items = [KIND_NAMES[e & _KIND] + ("(swallow)" if e & SWALLOW else "") for e in self._q]
        return f"ExpectedReplies({items}, skip_until_sync={self.skip_until_sync})"

    def push_frontend(self, code: int, swallow: bool = False) -> None:
        """Record a frontend message just sent to the backend."""
        kind = EXPECT_FOR[code]
        if not kind:
            return
        if self.skip_until_sync:
            # The backend discards everything up to Sync after an error; expect nothing back.
            if kind != SYNC:
                return
            self.skip_until_sync = False
        self._q.append(kind | SWALLOW if swallow else kind)

    def head(self) -> int:
        return self._q[0] if self._q else 0

    def pop(self) -> int:
        return self._q.popleft() if self._q else 0

    def error(self) -> None:
        """ErrorResponse while the head is an extended-protocol step: drop entries up to Sync."""
        q = self._q
        while q and (q[0] & _KIND) not in (SYNC, QUERY, FUNCTION_CALL):
            q.popleft()
        if not q:
            self.skip_until_sync = True

    def clear(self) -> None:
        self._q.clear()
        self.skip_until_sync = False


class ReplyScanner:
    """Backend → client stream: apply the FIFO, return the bytes that go to the client."""

    __slots__ = (
        "_fwd",
        "_pending",
        "_skip",
        "expected",
        "max_size",
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

    @property
    def idle(self) -> bool:
        """No reply outstanding: the backend waits for the next request."""
        return not self.expected._q and not self._skip and not self._pending

    def feed(self, data: bytes) -> bytes:
        # One flat loop on purpose: this runs for every reply the proxy relays.
        if self._pending:
            data = self._pending + data
            self._pending = b""
        n = len(data)
        pos = 0
        runs: list[bytes] | None = None
        run_start = 0  # start of the current forwarded run, -1 when not forwarding
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
        q = self.expected._q
        while True:
            if n - pos < 5:
                if pos < n:
                    self._pending = data[pos:]
                break
            code = data[pos]
            (length,) = _U32.unpack_from(data, pos + 1)
            if length < 4 or length > self.max_size:
                raise ProtocolViolation(f"backend sent invalid message length {length} for type {chr(code)!r}")
            end = pos + 1 + length
            if code in _INSPECT and end > n:
                self._pending = data[pos:]
                break
            # Which answer does this message belong to, and does it complete it?
            head = q[0] if q else 0
            fwd = not head & SWALLOW
            if code in _ASYNC:
                fwd = True
                if code == _S and self.on_parameter is not None:
                    self.on_parameter(data[pos + 5 : end])
            elif code == _Z:
                self.tx_status = data[pos + 5]
                if q:
                    q.popleft()
            elif code in _EXEC_DONE:
                if head & _KIND == EXECUTE:
                    q.popleft()
            elif code == _E:
                kind = head & _KIND
                if kind and kind not in (QUERY, FUNCTION_CALL, SYNC):
                    self.expected.error()
            elif code in (_PARSE_COMPLETE, _BIND_COMPLETE, _CLOSE_COMPLETE):
                if q:
                    q.popleft()
            elif code in (_NO_DATA, _ROW_DESCRIPTION) and head & _KIND == DESCRIBE:
                q.popleft()
            # Cut the output only around swallowed messages; the usual case forwards `data` whole.
            if fwd:
                if run_start < 0:
                    run_start = pos
            elif run_start >= 0:
                if runs is None:
                    runs = []
                if pos > run_start:
                    runs.append(data[run_start:pos])
                run_start = -1
            if end > n:
                self._skip = end - n
                self._fwd = fwd
                pos = n
                break
            pos = end
        # `pos` is where processing stopped: the end, or the start of a held-back tail.
        if runs is None and run_start == 0 and pos == n:
            return data
        if runs is None:
            runs = []
        if run_start >= 0 and pos > run_start:
            runs.append(data[run_start:pos])
        return b"".join(runs)
